"""The TensorRT runner's logic (runtime.py, backends/tensorrt/runner.py) around TensorRT and
pycuda, through FakeTensorRT/FakeCuda (tests/trt_doubles.py).

What these check: dtype mapping, binding by tensor name, profile selection
only when it changes, buffer reuse and growth, returned tensors never aliasing
the reused buffers, failures translated into EngineError with TensorRT's
messages, the primary CUDA context always popped, one execution context per
thread, per-thread pycuda state released with its context pushed, launches of
one context ordered across streams, NVTX verbosity, CUDA-graph capture and its
fallback, data-dependent output shapes refused at creation, the layer
profiler, the inspector, and the compile/load wiring. The device path runs
here through FakeTorchCuda; tests/test_gpu.py runs it on a real GPU.
"""

from __future__ import annotations

import gc
import logging
import threading

import numpy as np
import pytest
import torch

from trtopt import _deps, compiler
from trtopt.config import Backend, BuildConfig
from trtopt.profiles import InputRange, ShapeProfile
from trtopt.backends.tensorrt import runner as runtime
from trtopt.errors import EngineError, ShapeError
from trtopt.module import CompiledModule
from trtopt.runtime import TensorRTBackend
from trtopt.backends.tensorrt.runner import numpy_dtype_name, torch_dtype
from trtopt.spec import TRT_TO_NUMPY, ModuleSpec, TensorSpec

from .helpers import ENGINE, ENGINE_DD, PROFILES, SPEC, SPEC_DD, graph_backend, relu_model
from .trt_doubles import ContextOverlapError, FakeCuda, FakeLogicError, FakeTensorRT, FakeTorchCuda

@pytest.fixture()
def fakes(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeTensorRT, FakeCuda]:
    trt, cuda = FakeTensorRT(), FakeCuda()
    monkeypatch.setattr(_deps, "tensorrt", lambda: trt)
    monkeypatch.setattr(_deps, "cuda", lambda: cuda)
    return trt, cuda


@pytest.fixture()
def gpu(fakes, monkeypatch: pytest.MonkeyPatch) -> FakeTorchCuda:
    """The device path through FakeTorchCuda: "CUDA tensors", torch streams, events and graph capture."""
    fake = FakeTorchCuda()
    monkeypatch.setattr(runtime, "TorchCuda", lambda device_index: fake)
    return fake


def expected(x: torch.Tensor) -> torch.Tensor:
    return 2 * x + 1


def test_dtype_mapping_covers_io_types(fakes) -> None:
    trt, _ = fakes
    assert {m.name: numpy_dtype_name(m) for m in trt.DataType if m.name != "FP8"} == TRT_TO_NUMPY
    assert torch_dtype(trt.DataType.HALF) is torch.float16
    assert torch_dtype(trt.DataType.BF16) is torch.bfloat16
    assert torch_dtype(trt.DataType.BOOL) is torch.bool
    with pytest.raises(EngineError, match="FP8"):
        numpy_dtype_name(trt.DataType.FP8)


def test_runs_host_inputs_and_reuses_buffers(fakes) -> None:
    _, cuda = fakes
    backend = TensorRTBackend(ENGINE, SPEC)
    x = torch.randn(4, 4)
    first = backend.run({"x": x}, 0)
    torch.testing.assert_close(first[0], expected(x))
    allocations = (cuda.device_allocations, cuda.host_allocations)
    assert allocations == (2, 2)  # one device and one pinned host buffer per tensor

    second_input = torch.randn(4, 4)
    second = backend.run({"x": second_input}, 0)
    assert (cuda.device_allocations, cuda.host_allocations) == allocations  # same shape: reused
    torch.testing.assert_close(second[0], expected(second_input))
    torch.testing.assert_close(first[0], expected(x))  # earlier result not overwritten

    backend.run({"x": torch.randn(2, 4)}, 0)  # smaller: still reused
    assert (cuda.device_allocations, cuda.host_allocations) == allocations
    big = torch.randn(16, 4)
    torch.testing.assert_close(backend.run({"x": big}, 1)[0], expected(big))  # larger: grown
    assert (cuda.device_allocations, cuda.host_allocations) == (4, 4)
    assert FakeCuda.depth == 0  # the primary context was popped every time


def test_profile_is_selected_only_when_it_changes(fakes) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    for batch, index in [(2, 0), (3, 0), (16, 1), (20, 1), (1, 0)]:
        backend.run({"x": torch.ones(batch, 4)}, index)
    assert backend._state().context.profile_switches == [0, 1, 0]


def test_bindings_by_name_and_stream(fakes) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    backend.run({"x": torch.ones(3, 4)}, 0)
    state = backend._state()
    assert set(state.context.addresses) == {"x", "x_out"}
    assert state.context.addresses["x"] == int(state.buffers.device["x"][0])
    assert state.context.shapes == {"x": (3, 4)}
    assert state.stream.synchronized == 1


def test_numpy_inputs_through_compiled_module(fakes) -> None:
    module = CompiledModule(relu_model(), SPEC, TensorRTBackend(ENGINE, SPEC), ENGINE)
    x = np.random.rand(5, 4).astype(np.float32)
    y = module(x)
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, 2 * x + 1, rtol=1e-6)
    with pytest.raises(ShapeError, match="outside the compiled range"):
        module(np.zeros((40, 4), np.float32))


def test_unloadable_engine_explains_version_or_gpu_mismatch(fakes) -> None:
    with pytest.raises(EngineError) as info:
        TensorRTBackend(b"some other TensorRT's engine", SPEC)
    text = str(info.value)
    assert "TensorRT version that built it" in text and "GPU" in text
    assert "serialization version mismatch" in text  # TensorRT's own message is carried
    assert FakeCuda.depth == 0


def test_engine_of_another_model_is_refused(fakes) -> None:
    other = ModuleSpec(inputs=(TensorSpec("tokens", "float32", ("b", 4)),), outputs=SPEC.outputs,
                       output_structure={"type": "tensor"}, profiles=PROFILES, precision="fp32")
    with pytest.raises(EngineError, match="built from another model"):
        TensorRTBackend(ENGINE, other)


def test_execution_failure_and_bad_profile_become_engine_errors(fakes) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    FakeTensorRT.fail_execute = True
    with pytest.raises(EngineError, match="illegal memory access"):
        backend.run({"x": torch.ones(2, 4)}, 0)
    assert FakeCuda.depth == 0
    FakeTensorRT.fail_execute = False
    with pytest.raises(EngineError, match="profile 5 does not exist"):
        backend.run({"x": torch.ones(2, 4)}, 5)
    with pytest.raises(EngineError, match=r"(?s)rejected shape \(12, 4\).*outside profile 0"):
        backend.run({"x": torch.ones(12, 4)}, 0)  # the module would have chosen profile 1


def test_one_execution_context_per_thread(fakes) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    backend.run({"x": torch.ones(2, 4)}, 0)
    backend.run({"x": torch.ones(2, 4)}, 0)
    assert backend.contexts_created == 1  # same thread: same context
    results: dict[int, list[bool]] = {}
    barrier = threading.Barrier(4)

    def worker(seed: int) -> None:
        barrier.wait()
        ok = []
        for step in range(20):
            x = torch.full((1 + (seed + step) % 8, 4), float(seed * 100 + step))
            ok.append(torch.equal(backend.run({"x": x}, 0)[0], expected(x)))
        results[seed] = ok

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.contexts_created == 5
    assert all(all(ok) for ok in results.values()) and len(results) == 4


def test_layer_profiler_and_inspector(fakes) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    created = backend.contexts_created
    times = backend.profile_layers({"x": torch.ones(2, 4)}, 0, runs=3)
    assert times == [("fake_conv", 0.25), ("fake_relu", 0.05)]
    assert backend.contexts_created == created + 1  # a separate context, not this thread's
    assert backend._state().profiler is None
    assert backend.layer_information() == {"Layers": ["fake_conv", "fake_relu"], "format": "JSON"}


def test_compile_wiring_builds_runs_and_rebuilds_unloadable_engine(fakes, caplog) -> None:
    trt, _ = fakes
    config = BuildConfig(version_compatible=True, cuda_graph=False)
    spec = ModuleSpec(SPEC.inputs, SPEC.outputs, SPEC.output_structure, PROFILES, "fp32", {})
    backend, engine = compiler.make_backend(Backend.TENSORRT, relu_model(), spec, config)
    assert trt.builds == 1 and backend._runtime.engine_host_code_allowed
    assert spec.info["tensorrt"]["version_compatible"] is True  # saved with the module, read at load

    backend, engine = compiler.make_backend(Backend.TENSORRT, relu_model(), spec, BuildConfig(), engine,
                                            allow_host_code=True)
    assert trt.builds == 1  # the saved engine was used
    assert backend._runtime.engine_host_code_allowed  # asked for by the caller, as load(allow_host_code=True) does

    backend, rebuilt = compiler.make_backend(Backend.TENSORRT, relu_model(), spec, BuildConfig(), b"stale",
                                             allow_host_code=True)
    assert trt.builds == 2 and rebuilt.startswith(b"FAKE-ENGINE")
    assert "rebuilding it from the ONNX graph" in caplog.text and "cannot load it" in caplog.text


def test_load_uses_the_saved_engine(fakes, tmp_path, monkeypatch) -> None:
    trt, _ = fakes
    monkeypatch.setattr(_deps, "tensorrt_unavailable_reason", lambda: None)
    module = CompiledModule(relu_model(), SPEC, TensorRTBackend(ENGINE, SPEC), ENGINE)
    module.save(tmp_path / "m.trtopt")
    loaded = compiler.load(tmp_path / "m.trtopt")
    assert loaded.backend_name == "tensorrt" and loaded.engine == ENGINE and trt.builds == 0
    x = torch.rand(3, 4)
    torch.testing.assert_close(loaded(x), expected(x))


# ------------------------------------------------------------- issue 15: GPU path hardening
def _run_in_thread(target) -> None:
    errors: list[BaseException] = []

    def wrapped() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(exc)

    thread = threading.Thread(target=wrapped)
    thread.start()
    thread.join()
    gc.collect()
    if errors:
        raise errors[0]


def test_the_double_refuses_off_thread_frees_without_the_context(fakes) -> None:
    """What pycuda does, so the tests below mean something: an allocation made under a context
    retained on one thread cannot be freed on another thread without that context pushed."""
    _, cuda = fakes
    context = cuda.Device(0).retain_primary_context()
    context.push()
    allocation = cuda.mem_alloc(16)
    cuda.Context.pop()
    with pytest.raises(FakeLogicError, match="out-of-thread"):
        _run_in_thread(allocation.free)
    allocation.free()  # on the context's own thread pycuda activates it itself


def test_a_finished_threads_buffers_and_stream_are_released_with_the_context_pushed(fakes) -> None:
    """Issue 15 (1): a worker's thread-local state used to be dropped as the thread ended, with no
    context current, so pycuda leaked its pinned memory, device memory and stream."""
    backend = TensorRTBackend(ENGINE, SPEC)
    x = torch.rand(3, 4)
    _run_in_thread(lambda: torch.testing.assert_close(backend.run({"x": x}, 0)[0], expected(x)))
    assert FakeCuda.leaks == []
    assert sorted(set(FakeCuda.freed)) == ["device memory", "pinned host memory", "stream"]
    assert FakeCuda.depth == 0


def test_profile_layers_off_the_creating_thread_frees_its_buffers(fakes) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    times: list = []
    _run_in_thread(lambda: times.extend(backend.profile_layers({"x": torch.ones(2, 4)}, 0, runs=2)))
    assert times and FakeCuda.leaks == []
    assert "stream" in FakeCuda.freed


def test_close_releases_every_state_and_a_later_call_starts_afresh(fakes) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    backend.run({"x": torch.ones(2, 4)}, 0)
    backend.close()
    assert FakeCuda.freed.count("device memory") == 2 and FakeCuda.freed.count("stream") == 1
    x = torch.rand(2, 4)
    torch.testing.assert_close(backend.run({"x": x}, 0)[0], expected(x))
    del backend
    gc.collect()
    assert FakeCuda.leaks == []


def test_device_path_runs_on_the_current_stream_and_completes_only_at_synchronisation(gpu) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    x = gpu.tensor(torch.rand(3, 4))
    (y,) = backend.run({"x": x}, 0)
    assert gpu.is_device_tensor(y)
    assert not torch.equal(y, expected(x))  # still queued on the stream: a real GPU has not run it yet
    gpu.current_stream().synchronize()
    torch.testing.assert_close(y, expected(x))


def test_one_context_is_ordered_across_streams(gpu) -> None:
    """Issue 15 (2): a call on another torch stream, or with CPU inputs on the pycuda stream, while
    the previous launch may still run, overlapped two launches of one execution context."""
    backend = TensorRTBackend(ENGINE, SPEC)
    x1, x2 = gpu.tensor(torch.rand(2, 4)), gpu.tensor(torch.rand(2, 4))
    (y1,) = backend.run({"x": x1}, 0)  # on the default stream, not synchronised
    side = gpu.new_stream()
    with gpu.use_stream(side):
        (y2,) = backend.run({"x": x2}, 0)
    x3 = torch.rand(2, 4)
    with gpu.use_stream(gpu.new_stream()):
        (y_side,) = backend.run({"x": gpu.tensor(x3)}, 0)
    (y3,) = backend.run({"x": x3}, 0)  # CPU input: the pycuda stream
    assert FakeTensorRT.overlaps == []
    side.synchronize()
    torch.testing.assert_close(y1, expected(x1))  # the side stream waited for the first launch
    torch.testing.assert_close(y2, expected(x2))
    torch.testing.assert_close(y3, expected(x3))


def test_the_double_reports_overlapping_launches(gpu) -> None:
    """The double's check itself: without an event, a second stream overlaps the first launch."""
    backend = TensorRTBackend(ENGINE, SPEC)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(backend, "_wait_for_last_launch", lambda state, stream: None)
    try:
        backend.run({"x": gpu.tensor(torch.rand(2, 4))}, 0)
        with gpu.use_stream(gpu.new_stream()), pytest.raises(ContextOverlapError):
            backend.run({"x": gpu.tensor(torch.rand(2, 4))}, 0)
    finally:
        monkey.undo()


def test_contexts_that_do_not_profile_have_quiet_nvtx(fakes) -> None:
    """Issue 15 (5): DETAILED NVTX adds enqueue latency; only profiling contexts keep it."""
    trt, _ = fakes
    backend = TensorRTBackend(ENGINE, SPEC)
    backend.run({"x": torch.ones(2, 4)}, 0)
    assert backend._state().context.nvtx_verbosity == trt.ProfilingVerbosity.LAYER_NAMES_ONLY
    profiling = backend._new_state(runtime.make_profiler(trt))
    assert profiling.context.nvtx_verbosity == trt.ProfilingVerbosity.DETAILED
    profiling.release()


def test_cuda_graph_captures_once_and_replays_new_inputs(gpu) -> None:
    backend = graph_backend()
    xs = [torch.rand(4, 4) for _ in range(3)]
    outs = [backend.run({"x": gpu.tensor(x)}, 0)[0] for x in xs]
    gpu.synchronize()
    for x, y in zip(xs, outs):
        torch.testing.assert_close(y, expected(x))
    assert gpu.captures == 1 and backend._state().graph.graph.replays == 3
    assert FakeTensorRT.overlaps == []


def test_a_failed_capture_falls_back_to_plain_launches(gpu, caplog) -> None:
    """Issue 15 (6): an engine with a loop cannot be captured; the capture's own error used to
    escape (masking TensorRT's) and every call failed."""
    backend = graph_backend({"uncapturable": True})
    x = torch.rand(4, 4)
    with caplog.at_level(logging.WARNING, logger="trtopt.runtime"):
        (y,) = backend.run({"x": gpu.tensor(x)}, 0)
    gpu.synchronize()
    torch.testing.assert_close(y, expected(x))
    warning = next(r.getMessage() for r in caplog.records if r.name == "trtopt.runtime")
    assert "cannot be captured" in warning and "has a loop" in warning  # TensorRT's reason, not masked
    (y2,) = backend.run({"x": gpu.tensor(x)}, 0)
    gpu.synchronize()
    torch.testing.assert_close(y2, expected(x))
    assert gpu.captures == 1 and backend.graph_unsupported and FakeTensorRT.overlaps == []


def test_a_rejected_tensor_address_is_an_engine_error(fakes) -> None:
    """Issue 15 (8): set_tensor_address returns False (here: a misaligned buffer); it was ignored."""
    backend = TensorRTBackend(ENGINE, SPEC)
    FakeCuda.misalign = 64
    with pytest.raises(EngineError, match=r"rejected address .* for tensor 'x'"):
        backend.run({"x": torch.ones(2, 4)}, 0)
    assert FakeCuda.depth == 0


def test_a_rebuild_at_load_with_version_compatible_allows_host_code(fakes, tmp_path, monkeypatch) -> None:
    """Issue 15 (11): the module was built without version_compatible; its engine is stale on this
    TensorRT, so load(..., version_compatible=True) rebuilds it, and the new engine needs host code."""
    trt, _ = fakes
    monkeypatch.setattr(_deps, "tensorrt_unavailable_reason", lambda: None)
    spec = ModuleSpec(SPEC.inputs, SPEC.outputs, SPEC.output_structure, PROFILES, "fp32", {})
    backend, engine = compiler.make_backend(Backend.TENSORRT, relu_model(), spec, BuildConfig())
    CompiledModule(relu_model(), spec, backend, engine).save(tmp_path / "m.trtopt")
    trt.__version__ = FakeTensorRT.version = "10.100.0-fake"  # TensorRT upgraded: the saved engine no longer loads
    loaded = compiler.load(tmp_path / "m.trtopt", version_compatible=True)
    assert trt.builds == 2 and loaded.backend._runtime.engine_host_code_allowed
    assert loaded.spec.info["tensorrt"]["version_compatible"] is True
    assert loaded.spec.info["tensorrt"]["tensorrt_version"] == "10.100.0-fake"
    x = torch.rand(2, 4)
    torch.testing.assert_close(loaded(x), expected(x))


def test_machine_paths_are_not_saved_or_reused_by_load(fakes, tmp_path, monkeypatch) -> None:
    """Issue 15 (10): the build machine's timing_cache and engine_cache_dir stay on that machine."""
    trt, _ = fakes
    monkeypatch.setattr(_deps, "tensorrt_unavailable_reason", lambda: None)
    here = tmp_path / "build-machine"
    config = BuildConfig(timing_cache=str(here / "tc"), engine_cache_dir=str(here / "engines"))
    spec = ModuleSpec(SPEC.inputs, SPEC.outputs, SPEC.output_structure, PROFILES, "fp32",
                      {"build_config": compiler._engine_config_json(config)})
    backend, engine = compiler.make_backend(Backend.TENSORRT, relu_model(), spec, config)
    assert not {"timing_cache", "engine_cache_dir"} & set(spec.info["build_config"])
    # A file written before this fix still holds the paths; load must ignore them.
    spec.info["build_config"].update(timing_cache=str(here / "tc2"), engine_cache_dir=str(here / "engines2"))
    CompiledModule(relu_model(), spec, backend, b"stale").save(tmp_path / "m.trtopt")
    compiler.load(tmp_path / "m.trtopt")  # rebuilds the stale engine
    assert trt.builds == 2
    assert trt.builders[-1].config.timing_cache is None
    assert not (here / "tc2").exists() and not (here / "engines2").exists()


# ------------------------------------------------------------- issue 26: GPU path, second review
def test_a_refused_profile_is_an_engine_error_with_tensorrt_log(fakes) -> None:
    """Item 7: the bindings raise RuntimeError (and otherwise return True); it escaped untranslated."""
    backend = TensorRTBackend(ENGINE, SPEC)
    FakeTensorRT.fail_profile = True
    with pytest.raises(EngineError, match=r"(?s)optimization profile 0.*cannot be selected on this context"):
        backend.run({"x": torch.ones(2, 4)}, 0)
    assert FakeCuda.depth == 0


SPEC_XY = ModuleSpec(
    inputs=(TensorSpec("x", "float32", ("batch", 4)), TensorSpec("y", "float32", ("batch", 4))),
    outputs=(TensorSpec("x_out", "float32", ("batch", 4)), TensorSpec("y_out", "float32", ("batch", 4))),
    output_structure={"type": "tuple", "items": [{"type": "tensor"}] * 2},
    profiles=(ShapeProfile((InputRange("x", (1, 4), (4, 4), (8, 4), (0,)), InputRange("y", (1, 4), (4, 4), (8, 4), (0,)))),),
    precision="fp32",
)
ENGINE_XY = (b'FAKE-ENGINE{"inputs": ["x", "y"], "same_batch": true, '
             b'"profiles": [{"x": [[1, 4], [4, 4], [8, 4]], "y": [[1, 4], [4, 4], [8, 4]]}]}')


def test_inputs_inconsistent_with_each_other_are_a_shape_error_naming_them(fakes) -> None:
    """Item 8: each input inside the profile but batch sizes that must match differ; the output shapes
    then read -1 and were reported as a data-dependent shape."""
    backend = TensorRTBackend(ENGINE_XY, SPEC_XY)
    with pytest.raises(ShapeError, match=r"(?s)x=\(2, 4\), y=\(3, 4\).*inconsistent.*infer_shapes error code"):
        backend.run({"x": torch.ones(2, 4), "y": torch.ones(3, 4)}, 0)
    x, y = torch.rand(3, 4), torch.rand(3, 4)
    out = backend.run({"x": x, "y": y}, 0)
    torch.testing.assert_close(out[1], expected(y))
    assert FakeTensorRT.infer_shapes_calls >= 2  # called before the output shapes are read


def _positives(x: torch.Tensor) -> torch.Tensor:
    return 2 * x[x > 0] + 1


def test_data_dependent_outputs_run_through_an_output_allocator(fakes) -> None:
    """Item 11: such engines were refused; TensorRT sizes the output through IOutputAllocator."""
    backend = TensorRTBackend(ENGINE_DD, SPEC_DD)
    assert backend.data_dependent == ["x_out"]
    for batch in (3, 6, 2):
        x = torch.randn(batch, 4)
        (y,) = backend.run({"x": x}, 0)
        torch.testing.assert_close(y, _positives(x))
    assert FakeCuda.depth == 0


def test_data_dependent_outputs_on_the_device_path_are_fresh_each_call(gpu) -> None:
    backend = TensorRTBackend(ENGINE_DD, SPEC_DD, cuda_graph=True)
    assert backend.graph_unsupported  # sized during the launch: never captured
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    (y1,) = backend.run({"x": gpu.tensor(x1)}, 0)
    (y2,) = backend.run({"x": gpu.tensor(x2)}, 0)
    gpu.synchronize()
    torch.testing.assert_close(y1, _positives(x1))  # not overwritten by the second call
    torch.testing.assert_close(y2, _positives(x2))
    assert gpu.captures == 0


def test_sizing_host_outputs_allocates_no_tensor(fakes, monkeypatch) -> None:
    """Item 13: the output byte count used to allocate a tensor per output per call."""
    backend = TensorRTBackend(ENGINE, SPEC)

    def no_empty(*args, **kwargs):
        raise AssertionError("torch.empty called on the host path")

    monkeypatch.setattr(torch, "empty", no_empty)
    x = torch.rand(3, 4)
    torch.testing.assert_close(backend.run({"x": x}, 0)[0], expected(x))


def test_cuda_graph_static_tensors_come_from_the_callers_stream(gpu) -> None:
    """Item 3: outputs came from the capture stream's pool while replays wrote them on the caller's
    stream; dropping the graph (new shapes) returned blocks that stream still used."""
    backend = graph_backend()
    caller = gpu.new_stream()
    with gpu.use_stream(caller):
        for x in (torch.rand(4, 4), torch.rand(4, 4)):
            backend.run({"x": gpu.tensor(x)}, 0)
        other = gpu.new_stream()
        other.wait_stream(caller)
    with gpu.use_stream(other):  # a replay on another stream: the static tensors are recorded there
        backend.run({"x": gpu.tensor(torch.rand(4, 4))}, 0)
    with gpu.use_stream(caller):
        x = torch.rand(2, 4)
        (y,) = backend.run({"x": gpu.tensor(x)}, 0)  # new shapes: the old graph is dropped, unsynchronised
    gc.collect()
    assert gpu.hazards == []
    gpu.synchronize()
    torch.testing.assert_close(y, expected(x))


def test_concurrent_first_captures_keep_cuda_graphs_on(gpu) -> None:
    """Item 5: torch.cuda.graph's __enter__ fails while another thread captures; that marked the
    engine uncapturable for good. Captures now take turns (runtime.CAPTURE_LOCK)."""
    backend = graph_backend()
    inside, attempted = threading.Event(), threading.Event()
    real_capture = gpu.capture

    def capture(graph, stream):
        if inside.is_set():
            attempted.set()  # the second thread reached the capture while the first one is in it
        return _holding(real_capture(graph, stream))

    import contextlib

    @contextlib.contextmanager
    def _holding(context):
        with context:
            if not inside.is_set():
                inside.set()
                attempted.wait(0.5)  # give the other thread time to collide
            yield

    gpu.capture = capture
    results: dict[str, torch.Tensor] = {}

    def first() -> None:
        results["a"] = backend.run({"x": gpu.tensor(torch.ones(4, 4))}, 0)[0]

    def second() -> None:
        inside.wait(5)
        results["b"] = backend.run({"x": gpu.tensor(torch.ones(4, 4))}, 0)[0]

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gpu.synchronize()
    assert not backend.graph_unsupported and gpu.captures == 2
    torch.testing.assert_close(results["b"], expected(torch.ones(4, 4)))


def test_a_capture_that_fails_before_it_begins_is_retried(gpu, monkeypatch) -> None:
    """Item 5: only a failure of the capture itself marks the engine uncapturable."""
    backend = graph_backend()
    real_capture = gpu.capture
    calls = []

    def failing_once(graph, stream):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("fake: empty_cache() while another thread is capturing a CUDA graph")
        return real_capture(graph, stream)

    monkeypatch.setattr(gpu, "capture", failing_once)
    x = torch.rand(4, 4)
    (y,) = backend.run({"x": gpu.tensor(x)}, 0)  # a plain launch this time
    assert not backend.graph_unsupported
    (y2,) = backend.run({"x": gpu.tensor(x)}, 0)
    gpu.synchronize()
    torch.testing.assert_close(y, expected(x))
    torch.testing.assert_close(y2, expected(x))
    assert gpu.captures == 1 and backend._state().graph is not None


def test_launches_from_the_legacy_default_stream_go_to_a_side_stream(gpu) -> None:
    """Item 6: TensorRT synchronises the device around launches on stream 0 and serialises threads."""
    backend = TensorRTBackend(ENGINE, SPEC)
    x = torch.rand(3, 4)
    (y,) = backend.run({"x": gpu.tensor(x)}, 0)
    assert FakeTensorRT.default_stream_launches == 0
    side = backend._state().side_stream
    assert side is not None and gpu.blocks[y.data_ptr()].recorded == {gpu.current_stream().handle}
    gpu.current_stream().synchronize()  # the caller's stream waits for the side stream
    torch.testing.assert_close(y, expected(x))
    with gpu.use_stream(gpu.new_stream()):
        backend.run({"x": gpu.tensor(x)}, 0)  # a non-default stream is used as it is
    assert FakeTensorRT.default_stream_launches == 0 and FakeTensorRT.overlaps == []


def _saved_module(tmp_path, config: BuildConfig):
    spec = ModuleSpec(SPEC.inputs, SPEC.outputs, SPEC.output_structure, PROFILES, "fp32",
                      {"build_config": compiler._engine_config_json(config)})
    backend, engine = compiler.make_backend(Backend.TENSORRT, relu_model(), spec, config)
    return CompiledModule(relu_model(), spec, backend, engine).save(tmp_path / "m.trtopt")


def test_a_saved_engine_from_another_gpu_model_is_rebuilt(fakes, tmp_path, monkeypatch, caplog) -> None:
    """Item 2: TensorRT loads an engine from another GPU model of the same compute capability with
    only a warning, and it may fail in enqueueV3; the module file now records the GPU."""
    trt, _ = fakes
    monkeypatch.setattr(_deps, "tensorrt_unavailable_reason", lambda: None)
    path = _saved_module(tmp_path, BuildConfig())
    FakeCuda.device_name = "Other GPU 24GB"  # same compute capability 8.9
    with caplog.at_level(logging.WARNING, logger="trtopt.compiler"):
        loaded = compiler.load(path)
    assert trt.builds == 2
    assert "built for Fake GPU 80GB" in caplog.text and "Other GPU 24GB" in caplog.text
    assert loaded.spec.info["tensorrt"]["gpu"]["name"] == "Other GPU 24GB"


def test_hardware_compatible_engines_are_kept_on_another_gpu(fakes, tmp_path, monkeypatch) -> None:
    trt, _ = fakes
    monkeypatch.setattr(_deps, "tensorrt_unavailable_reason", lambda: None)
    path = _saved_module(tmp_path, BuildConfig(hardware_compatibility="ampere_plus"))
    FakeCuda.device_name, FakeCuda.compute_capability = "Other GPU 24GB", (9, 0)
    compiler.load(path)
    assert trt.builds == 1


def test_a_version_compatible_engine_runs_its_host_code_only_when_allowed(fakes, tmp_path, monkeypatch, caplog) -> None:
    """Item 12: the file's own manifest used to allow its engine's embedded native code."""
    trt, _ = fakes
    monkeypatch.setattr(_deps, "tensorrt_unavailable_reason", lambda: None)
    path = _saved_module(tmp_path, BuildConfig(version_compatible=True))
    with caplog.at_level(logging.WARNING, logger="trtopt.compiler"):
        rebuilt = compiler.load(path)
    assert trt.builds == 2  # rebuilt from the graph the file carries
    assert [r.getMessage() for r in caplog.records if "allow_host_code=True" in r.getMessage()]
    trusted = compiler.load(path, allow_host_code=True)
    assert trt.builds == 2 and trusted.backend._runtime.engine_host_code_allowed
    x = torch.rand(2, 4)
    torch.testing.assert_close(rebuilt(x), expected(x))


def test_the_cli_passes_allow_host_code_to_load(fakes) -> None:
    from trtopt.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["export-triton", "m.trtopt", "repo", "--name", "m", "--allow-host-code"]).allow_host_code
    assert not parser.parse_args(["bench", "m.trtopt"]).allow_host_code


def test_data_dependent_outputs_found_only_at_call_time_run_without_a_graph(gpu) -> None:
    """A spec without profiles cannot be probed at creation; the first call finds the output."""
    spec = ModuleSpec(SPEC_DD.inputs, SPEC_DD.outputs, SPEC_DD.output_structure, (), "fp32")
    backend = TensorRTBackend(ENGINE_DD, spec, cuda_graph=True)
    assert backend.data_dependent == [] and not backend.graph_unsupported
    x = torch.randn(4, 4)
    (y,) = backend.run({"x": gpu.tensor(x)}, 0)
    gpu.synchronize()
    torch.testing.assert_close(y, _positives(x))
    assert backend.data_dependent == ["x_out"] and backend.graph_unsupported


def test_a_failed_device_call_still_orders_its_queued_profile_switch(gpu) -> None:
    """set_optimization_profile_async queues work on the stream; a call that fails after it (here: the
    inputs are inconsistent) must still order the context's next use on another stream after it."""
    backend = TensorRTBackend(ENGINE_XY, SPEC_XY)
    first = gpu.new_stream()
    with gpu.use_stream(first), pytest.raises(ShapeError):
        backend.run({"x": gpu.tensor(torch.ones(2, 4)), "y": gpu.tensor(torch.ones(3, 4))}, 0)
    x = torch.rand(3, 4)
    with gpu.use_stream(gpu.new_stream()):
        out = backend.run({"x": gpu.tensor(x), "y": gpu.tensor(x)}, 0)
    gpu.synchronize()
    torch.testing.assert_close(out[0], expected(x))
    assert FakeTensorRT.overlaps == []


@pytest.mark.parametrize(
    "record, here, problem",
    [
        ({"gpu": {"name": "Fake GPU 80GB", "compute_capability": "8.9"}}, {}, None),
        ({"gpu": {"name": "A", "compute_capability": "8.9"}, "hardware_compatibility": "same_compute_capability"}, {}, None),
        ({"gpu": {"name": "A", "compute_capability": "9.0"}, "hardware_compatibility": "same_compute_capability"}, {},
         "its compute capability only"),
        ({"gpu": {"name": "A", "compute_capability": "9.0"}, "hardware_compatibility": "ampere_plus"}, {}, None),
        ({"gpu": {"name": "A", "compute_capability": "9.0"}, "hardware_compatibility": "ampere_plus"},
         {"compute_capability": (7, 5)}, "8.0 and newer"),
        ({"tensorrt_version": "10.99.0-fake", "tensorrt_build": "cu13"}, {"build": "cu12"}, "10.99.0-fake cu13"),
        ({"tensorrt_version": "10.98.0-fake", "version_compatible": True}, {}, None),  # with allow_host_code
        ({"version_compatible": False}, {}, None),  # a file from before the record: nothing to compare
    ],
)
def test_which_saved_engines_are_used_here(fakes, monkeypatch, record, here, problem) -> None:
    from trtopt.backends.tensorrt import build as builder

    if "compute_capability" in here:
        FakeCuda.compute_capability = here["compute_capability"]
    monkeypatch.setattr(builder, "tensorrt_build", lambda trt: here.get("build", ""))
    found = builder.saved_engine_problem(record, allow_host_code=True)
    assert (found is None) if problem is None else (problem in found), found
