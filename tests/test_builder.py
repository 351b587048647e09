"""The TensorRT build's logic (builder.py, backends/tensorrt/build.py) around TensorRT,
through FakeTensorRT/FakeCuda (tests/trt_doubles.py).

What these check: the network flag, profiles sent to TensorRT and checked
against the network's inputs, engine settings applied, parser and build
failures turned into BuildError with TensorRT's own messages, the timing cache
round trip, parsing from a file with external weights, and that the logger,
progress monitor and heartbeat never raise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import trtopt
from trtopt import _deps, graph
from trtopt.backends.tensorrt import build as builder, trt_logging
from trtopt.config import BuildConfig
from trtopt.profiles import InputRange, ShapeProfile
from trtopt.errors import BuildError

from .helpers import profile, relu_model
from .trt_doubles import FakeBuilder, FakeCuda, FakeTensorRT


def test_strongly_typed_network_profiles_and_settings(fake_trt: FakeTensorRT) -> None:
    config = BuildConfig(workspace_bytes=1 << 28, optimization_level=5, version_compatible=True,
                         hardware_compatibility="ampere_plus")
    engine = builder.build_engine(relu_model(), [profile(1, 8, 32), profile(33, 48, 64)], config)
    assert engine.startswith(b"FAKE-ENGINE")
    built = fake_trt.builders[-1]
    assert built.network.flags == 1 << int(fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    cfg = built.config
    assert [p.shapes for p in cfg.profiles] == [
        {"x": ((1, 4), (8, 4), (32, 4))},
        {"x": ((33, 4), (48, 4), (64, 4))},
    ]
    assert cfg.pool_limits == {fake_trt.MemoryPoolType.WORKSPACE: 1 << 28}
    assert cfg.builder_optimization_level == 5
    assert cfg.flags == {fake_trt.BuilderFlag.VERSION_COMPATIBLE}
    assert cfg.hardware_compatibility_level == fake_trt.HardwareCompatibilityLevel.AMPERE_PLUS
    assert cfg.profiling_verbosity == fake_trt.ProfilingVerbosity.DETAILED
    assert cfg.progress_monitor is not None  # IProgressMonitor exists, so it is used


def test_defaults_leave_tensorrt_defaults(fake_trt: FakeTensorRT) -> None:
    builder.build_engine(relu_model(), [profile()], BuildConfig())
    cfg = fake_trt.builders[-1].config
    assert cfg.pool_limits == {} and cfg.flags == set() and cfg.hardware_compatibility_level is None


def test_static_network_gets_no_profile(fake_trt: FakeTensorRT) -> None:
    static = ShapeProfile((InputRange("x", (2, 4), (2, 4), (2, 4)),))
    builder.build_engine(relu_model((2, 4)), [static], BuildConfig())
    assert fake_trt.builders[-1].config.profiles == []


def test_same_compute_capability_needs_a_tensorrt_that_has_it(fake_trt: FakeTensorRT, monkeypatch) -> None:
    monkeypatch.setattr(FakeTensorRT, "HardwareCompatibilityLevel",
                        __import__("enum").IntEnum("H", {"NONE": 0, "AMPERE_PLUS": 1}))
    with pytest.raises(BuildError, match="same_compute_capability.*upgrade TensorRT"):
        builder.build_engine(relu_model(), [profile()], BuildConfig(hardware_compatibility="same_compute_capability"))


def test_parse_failure_lists_node_and_operator(fake_trt: FakeTensorRT) -> None:
    FakeTensorRT.unsupported_ops = {"Relu"}
    with pytest.raises(BuildError) as info:
        builder.build_engine(relu_model(), [profile()], BuildConfig())
    assert "node act0 (Relu): no importer registered" in str(info.value)
    assert "1 error(s)" in str(info.value)


@pytest.mark.parametrize(
    "bad, message",
    [
        (profile(name="other"), r"no range for \['x'\].*unknown input\(s\) \['other'\]"),
        (ShapeProfile((InputRange("x", (1,), (2,), (3,), (0,)),)), "rank 2 in the network"),
        (ShapeProfile((InputRange("x", (1, 2), (1, 4), (1, 8), (0, 1)),)), "dimension 1 is fixed at 4"),
    ],
)
def test_profiles_checked_against_network_inputs(fake_trt: FakeTensorRT, bad, message) -> None:
    with pytest.raises(BuildError, match=message):
        builder.build_engine(relu_model(), [profile(), bad], BuildConfig())


def test_profile_tensorrt_rejects_becomes_build_error(fake_trt: FakeTensorRT) -> None:
    FakeTensorRT.reject_profiles = True  # add_optimization_profile returns -1
    with pytest.raises(BuildError, match=r"(?s)rejected optimization profile 0.*invalid profile for x"):
        builder.build_engine(relu_model(), [profile()], BuildConfig())


def test_set_shape_raising_becomes_build_error(fake_trt: FakeTensorRT) -> None:
    """Issue 15 (9): the real set_shape raises RuntimeError on an inconsistent range (opt < min
    here); it used to escape as a bare RuntimeError."""
    with pytest.raises(BuildError, match=r"(?s)input 'x' in optimization profile 1.*inconsistent dimensions"):
        builder.build_engine(relu_model(), [profile(), profile(4, 2, 8)], BuildConfig())


def test_failed_build_carries_tensorrt_errors(fake_trt: FakeTensorRT) -> None:
    FakeTensorRT.fail_build = True
    with pytest.raises(BuildError, match="out of tactics for node X"):
        builder.build_engine(relu_model(), [profile()], BuildConfig())


def test_parses_from_a_file_with_external_weights(fake_trt: FakeTensorRT, monkeypatch) -> None:
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 0)
    model = relu_model(op="Add")
    w = onnx.numpy_helper.from_array(np.array([1.0, 2.0, 3.0, 4.0], np.float32), "w")  # raw_data
    model.graph.initializer.append(w)
    model.graph.node[0].input.append("w")
    builder.build_engine(model, [profile()], BuildConfig())
    assert Path(FakeTensorRT.last_parsed_path).name == "model.onnx"
    assert fake_trt.builds == 1
    # The caller's model keeps its weights (onnx's external-data save empties the proto it gets).
    assert model.graph.initializer[0].data_location == TensorProto.DEFAULT
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_timing_cache_loaded_updated_and_saved(fake_trt: FakeTensorRT, tmp_path: Path, caplog) -> None:
    path = tmp_path / "sub" / "timing.cache"
    config = BuildConfig(timing_cache=str(path))
    builder.build_engine(relu_model(), [profile()], config)
    assert path.read_bytes() == b"FAKE-TC fake-gpu b1"
    builder.build_engine(relu_model(), [profile()], config)
    assert path.read_bytes() == b"FAKE-TC fake-gpu b1,b2"  # loaded, used, updated
    for content in (b"garbage", b"FAKE-TC other-gpu x7"):  # corrupt, and from another GPU
        path.write_bytes(content)
        with caplog.at_level(logging.WARNING, logger="trtopt.builder"):
            builder.build_engine(relu_model(), [profile()], config)
        assert "starting a new one" in caplog.text
        assert path.read_bytes() == b"FAKE-TC fake-gpu b%d" % fake_trt.builds
    # No temporary files left; the lock file stays, as Polygraphy's does.
    assert sorted(p.name for p in path.parent.iterdir()) == ["timing.cache", "timing.cache.lock"]


def test_concurrent_builds_keep_each_others_timing_cache_entries(fake_trt: FakeTensorRT, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Issue 15 (10): the save merges with the file's latest contents (under a lock) instead of
    overwriting what another build saved since this one loaded the cache."""
    path = tmp_path / "timing.cache"
    path.write_bytes(b"FAKE-TC fake-gpu first")
    real_build = FakeBuilder.build_serialized_network

    def build_while_another_process_saves(self, network, config):
        path.write_bytes(b"FAKE-TC fake-gpu first,other")  # saved by a concurrent build meanwhile
        return real_build(self, network, config)

    monkeypatch.setattr(FakeBuilder, "build_serialized_network", build_while_another_process_saves)
    builder.build_engine(relu_model(), [profile()], BuildConfig(timing_cache=str(path)))
    assert path.read_bytes() == b"FAKE-TC fake-gpu b1,first,other"


def test_a_timing_cache_that_cannot_be_saved_keeps_the_engine(fake_trt: FakeTensorRT, tmp_path: Path,
                                                              monkeypatch, caplog) -> None:
    """Issue 15 (10): an OSError while saving the timing cache used to lose the built engine."""

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(builder, "atomic_write", disk_full)
    with caplog.at_level(logging.WARNING, logger="trtopt.builder"):
        engine = builder.build_engine(relu_model(), [profile()], BuildConfig(timing_cache=str(tmp_path / "tc")))
    assert engine.startswith(b"FAKE-ENGINE")
    assert "could not save" in caplog.text and "No space left" in caplog.text


def test_logger_bridge_maps_levels_and_never_raises(fake_trt: FakeTensorRT, caplog) -> None:
    bridge = trt_logging.make_logger(fake_trt)
    severity = fake_trt.ILogger.Severity

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("boom")

    with caplog.at_level(1, logger="trtopt.tensorrt"):
        with bridge.errors.capture() as errors:
            bridge.log(severity.ERROR, "bad thing")
            bridge.log(severity.WARNING, "careful")
            bridge.log(severity.VERBOSE, "detail")
            bridge.log(severity.ERROR, Unprintable())  # must not raise
            bridge.log(None, "no severity at all")  # unknown severity: logged as a warning
    assert errors == ["bad thing"]
    levels = {r.getMessage(): r.levelno for r in caplog.records if r.name == "trtopt.tensorrt"}
    assert levels == {"bad thing": logging.ERROR, "careful": logging.WARNING, "detail": trt_logging.VERBOSE,
                      "no severity at all": logging.WARNING}
    assert list(bridge.errors.recent) == ["bad thing"]


def test_logger_bridge_survives_a_raising_logging_setup(fake_trt: FakeTensorRT, monkeypatch) -> None:
    bridge = trt_logging.make_logger(fake_trt)

    def explode(*args, **kwargs):
        raise KeyboardInterrupt  # even a BaseException stays on the Python side

    monkeypatch.setattr(trt_logging.trt_logger, "log", explode)
    monkeypatch.setattr(trt_logging.trt_logger, "isEnabledFor", lambda level: True)
    bridge.log(fake_trt.ILogger.Severity.ERROR, "still recorded")
    assert list(bridge.errors.recent) == ["still recorded"]


def test_progress_monitor_logs_and_never_cancels(fake_trt: FakeTensorRT, caplog, monkeypatch) -> None:
    monitor = builder.make_progress_monitor(fake_trt, interval_s=0.0)
    with caplog.at_level(logging.INFO, logger="trtopt.builder"):
        monitor.phase_start("Building engine", None, 3)
        assert monitor.step_complete("Building engine", 0) is True
        monitor.phase_finish("Building engine")
    assert "Building engine (3 steps)" in caplog.text and "step 1/3" in caplog.text
    monkeypatch.setattr(builder.logger, "info", lambda *a: 1 / 0)
    assert monitor.step_complete("Building engine", 1) is True  # a failing log call is swallowed


def test_heartbeat_when_tensorrt_has_no_progress_monitor(fake_trt: FakeTensorRT, monkeypatch, caplog) -> None:
    monkeypatch.delattr(FakeTensorRT, "IProgressMonitor")
    real_heartbeat = builder.heartbeat
    beats: list[str] = []
    monkeypatch.setattr(builder, "heartbeat", lambda: _recording_heartbeat(beats))
    builder.build_engine(relu_model(), [profile()], BuildConfig())
    assert beats == ["start", "stop"]
    assert fake_trt.builders[-1].config.progress_monitor is None
    with caplog.at_level(logging.INFO, logger="trtopt.builder"):
        with real_heartbeat(0.01):
            __import__("time").sleep(0.1)
    assert "still running" in caplog.text


def _recording_heartbeat(beats: list[str]):
    import contextlib

    @contextlib.contextmanager
    def cm():
        beats.append("start")
        yield
        beats.append("stop")

    return cm()


def test_gpu_fingerprint(fake_trt: FakeTensorRT) -> None:
    assert builder.gpu_fingerprint(0) == {"name": "Fake GPU 80GB", "compute_capability": "8.9"}


def test_build_without_tensorrt_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(_deps, "_import", lambda name: None)
    with pytest.raises(trtopt.DependencyError, match=r"trtopt\[gpu-cu12\]"):
        builder.build_engine(relu_model(), [profile()], BuildConfig())


def test_availability_probes_the_builder(monkeypatch, caplog) -> None:
    """Issue 15 (4): with a driver too old for the installed TensorRT, tensorrt and pycuda import
    but trt.Builder fails; backend='auto' must fall back (and tests/test_gpu.py skip) instead of
    failing in the build."""
    from trtopt import compiler
    from trtopt.config import Backend

    fake, cuda = FakeTensorRT(), FakeCuda()
    monkeypatch.setattr(_deps, "_import", lambda name: {"tensorrt": fake, "pycuda.driver": cuda}.get(name))
    _deps.tensorrt_unavailable_reason.cache_clear()
    try:
        assert _deps.tensorrt_unavailable_reason() is None
        _deps.tensorrt_unavailable_reason.cache_clear()
        FakeTensorRT.builder_error = "CUDA initialization failure with error: 35"
        reason = _deps.tensorrt_unavailable_reason()
        assert reason is not None and "cannot create a builder" in reason and "error: 35" in reason
        with caplog.at_level(logging.INFO, logger="trtopt.compiler"):
            assert compiler.select_backend("auto") is Backend.ONNXRUNTIME
        assert "error: 35" in caplog.text
        with pytest.raises(trtopt.DependencyError, match="driver is too old"):
            compiler.select_backend("tensorrt")
    finally:
        _deps.tensorrt_unavailable_reason.cache_clear()


def test_tf32_is_cleared_unless_asked_for(fake_trt: FakeTensorRT) -> None:
    """Issue 26 item 4: TensorRT sets TF32 by default, so "fp32" engines ran TF32 math."""
    builder.build_engine(relu_model(), [profile()], BuildConfig())
    assert fake_trt.BuilderFlag.TF32 not in fake_trt.builders[-1].config.flags
    builder.build_engine(relu_model(), [profile()], BuildConfig(tf32=True))
    assert fake_trt.BuilderFlag.TF32 in fake_trt.builders[-1].config.flags


def test_a_static_shape_tensor_input_is_refused(fake_trt: FakeTensorRT) -> None:
    """Issue 26 item 13: the refusal ran only when some dimension was dynamic."""
    FakeTensorRT.shape_tensor_inputs = {"x"}
    static = ShapeProfile((InputRange("x", (2, 4), (2, 4), (2, 4), ()),))
    with pytest.raises(BuildError, match="'x' is a shape tensor"):
        builder.build_engine(relu_model((2, 4)), [static], BuildConfig())


def test_tensorrt_build_names_the_cuda_major_version(monkeypatch) -> None:
    """Issue 26 item 1: tensorrt-cu12 and -cu13 of one release report the same __version__."""
    from importlib import metadata

    monkeypatch.setattr(metadata, "packages_distributions", lambda: {"tensorrt": ["tensorrt_cu13_bindings"]})
    assert builder.tensorrt_build(FakeTensorRT()) == "cu13"
    monkeypatch.setattr(metadata, "packages_distributions", lambda: {"tensorrt": ["tensorrt"]})
    assert builder.tensorrt_build(FakeTensorRT()) == ""  # NVIDIA's tar/deb packages do not say
