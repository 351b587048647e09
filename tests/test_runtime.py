"""runtime.py's logic around TensorRT and pycuda, through FakeTensorRT/FakeCuda (tests/trt_doubles.py).

What these check: dtype mapping, binding by tensor name, profile selection
only when it changes, buffer reuse and growth, returned tensors never aliasing
the reused buffers, failures translated into EngineError with TensorRT's
messages, the primary CUDA context always popped, one execution context per
thread, the layer profiler, the inspector, and the compile/load wiring.
The CUDA-tensor and CUDA-graph paths need a GPU: tests/test_gpu.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from trtopt import _deps, compiler
from trtopt.config import Backend, BuildConfig, InputRange, ShapeProfile
from trtopt.errors import EngineError, ShapeError
from trtopt.module import CompiledModule, ModuleSpec, TensorSpec
from trtopt.runtime import TRT_TO_NUMPY, TensorRTBackend, numpy_dtype_name, torch_dtype

from .test_builder import relu_model
from .trt_doubles import FakeCuda, FakeTensorRT

PROFILES = (
    ShapeProfile((InputRange("x", (1, 4), (4, 4), (8, 4), (0,)),)),
    ShapeProfile((InputRange("x", (9, 4), (16, 4), (32, 4), (0,)),)),
)
SPEC = ModuleSpec(
    inputs=(TensorSpec("x", "float32", ("batch", 4)),),
    outputs=(TensorSpec("x_out", "float32", ("batch", 4)),),
    output_structure={"type": "tensor"},
    profiles=PROFILES,
    precision="fp32",
)
ENGINE = b'FAKE-ENGINE{"inputs": ["x"], "profiles": [{"x": [[1, 4], [4, 4], [8, 4]]}, {"x": [[9, 4], [16, 4], [32, 4]]}]}'


@pytest.fixture()
def fakes(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeTensorRT, FakeCuda]:
    trt, cuda = FakeTensorRT(), FakeCuda()
    monkeypatch.setattr(_deps, "tensorrt", lambda: trt)
    monkeypatch.setattr(_deps, "cuda", lambda: cuda)
    return trt, cuda


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


def test_data_dependent_output_shape_is_refused(fakes, monkeypatch) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    context = backend._state().context
    monkeypatch.setattr(context, "get_tensor_shape", lambda name: (-1, 4))
    with pytest.raises(EngineError, match="data-dependent shape"):
        backend.run({"x": torch.ones(2, 4)}, 0)


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
    times = backend.profile_layers({"x": torch.ones(2, 4)}, 0, runs=3)
    assert times == [("fake_conv", 0.25), ("fake_relu", 0.05)]
    assert backend.contexts_created == 1  # a separate context, not this thread's
    assert backend.layer_information() == {"Layers": ["fake_conv", "fake_relu"], "format": "JSON"}


def test_compile_wiring_builds_runs_and_rebuilds_unloadable_engine(fakes, caplog) -> None:
    trt, _ = fakes
    config = BuildConfig(version_compatible=True, cuda_graph=False)
    spec = ModuleSpec(SPEC.inputs, SPEC.outputs, SPEC.output_structure, PROFILES, "fp32", {})
    backend, engine = compiler.make_backend(Backend.TENSORRT, relu_model(), spec, config)
    assert trt.builds == 1 and backend._runtime.engine_host_code_allowed
    assert spec.info["tensorrt"] == {"version_compatible": True}  # saved with the module, read at load

    backend, engine = compiler.make_backend(Backend.TENSORRT, relu_model(), spec, BuildConfig(), engine)
    assert trt.builds == 1  # the saved engine was used
    assert backend._runtime.engine_host_code_allowed  # from spec.info, not the default config

    backend, rebuilt = compiler.make_backend(Backend.TENSORRT, relu_model(), spec, BuildConfig(), b"stale")
    assert trt.builds == 2 and rebuilt.startswith(b"FAKE-ENGINE")
    assert "rebuilding it from the ONNX graph" in caplog.text


def test_load_uses_the_saved_engine(fakes, tmp_path, monkeypatch) -> None:
    trt, _ = fakes
    monkeypatch.setattr(_deps, "tensorrt_unavailable_reason", lambda: None)
    module = CompiledModule(relu_model(), SPEC, TensorRTBackend(ENGINE, SPEC), ENGINE)
    module.save(tmp_path / "m.trtopt")
    loaded = compiler.load(tmp_path / "m.trtopt")
    assert loaded.backend_name == "tensorrt" and loaded.engine == ENGINE and trt.builds == 0
    x = torch.rand(3, 4)
    torch.testing.assert_close(loaded(x), expected(x))
