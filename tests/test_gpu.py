"""Real TensorRT engines on a real GPU (tier 2). Run with ``pytest -m gpu`` on a machine with an
NVIDIA GPU, TensorRT 10 or 11, pycuda and a CUDA build of torch; skipped with the reason elsewhere.

Every test compiles real models through ``trtopt.compile(..., backend="tensorrt")`` and compares
with the torch model on the same inputs, at FP32_RTOL (TF32 and tactic choice differ between
builds). Outputs are compared more tightly only when they come from one engine (one build, or
the engine cache); tests/test_gpu_setup.py checks that rule on a CPU.
"""

from __future__ import annotations

import gc
import logging
import threading
import warnings

import pytest
import torch

import trtopt
from trtopt import _deps
from trtopt.executor.fp16_emulation import check_against_engine

from ._models import ResidualCNN
from .helpers import max_relative_error


def _unavailable() -> str | None:
    reason = _deps.tensorrt_unavailable_reason()
    if reason is None and not torch.cuda.is_available():
        reason = "torch was installed without CUDA support"
    return reason


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_unavailable() is not None, reason=f"{_unavailable()}")]

FP32_RTOL = 5e-3  # tactics (summation orders) differ between builds; TF32 is off unless tf32=True
DYNAMIC = {"x": {0: (1, 4, 16)}}
BATCHES = (1, 3, 4, 16)  # min, odd, opt, max of the profile


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return ResidualCNN().eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def fp32(model: torch.nn.Module, cache_dir: str) -> trtopt.CompiledModule:
    return trtopt.compile(model, (torch.randn(4, 3, 32, 32),), backend="tensorrt", dynamic_shapes=DYNAMIC,
                          engine_cache_dir=cache_dir)


def reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.cpu())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("batch", BATCHES)
def test_fp32_matches_torch_across_the_profile(fp32, model, batch: int, device: str) -> None:
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = fp32(x)
    assert fp32.backend_name == "tensorrt" and y.device.type == device
    assert max_relative_error(y, reference(model, x)) < FP32_RTOL


def test_numpy_in_numpy_out(fp32, model) -> None:
    x = torch.randn(2, 3, 32, 32)
    y = fp32(x.numpy())
    assert max_relative_error(torch.from_numpy(y), reference(model, x)) < FP32_RTOL


def test_fp16_engine(model) -> None:
    fast = trtopt.compile(model, (torch.randn(4, 3, 32, 32),), precision="fp16", backend="tensorrt",
                          dynamic_shapes=DYNAMIC)
    for batch in BATCHES:
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        assert max_relative_error(fast(x), reference(model, x)) < 2e-2


def test_int8_engine(model) -> None:
    torch.manual_seed(1)
    calibration = [torch.randn(8, 3, 32, 32) for _ in range(16)]
    fast = trtopt.compile(model, (torch.randn(4, 3, 32, 32),), precision="int8", backend="tensorrt",
                          dynamic_shapes=DYNAMIC, calibration_data=calibration)
    for batch in BATCHES:
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        # Random weights and data: a loose bound that still fails on wrong scales or a broken graph.
        assert max_relative_error(fast(x), reference(model, x)) < 0.15


def test_the_cpu_fp16_emulation_is_never_looser_than_the_engine(model) -> None:
    """Every graph tensor a real INT8 engine (FP16 float part) writes in FP16 is one the CPU emulation
    rounds or knows to hold FP16 values; what it rounds that the engine never stores is only logged
    (there the emulation is stricter than TensorRT; benchmarks/fp16_fidelity.py lists it)."""
    calibration = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    fast = trtopt.compile(model, (torch.randn(4, 3, 32, 32),), precision="int8", backend="tensorrt",
                          dynamic_shapes=DYNAMIC, calibration_data=calibration)
    check = check_against_engine(fast.onnx_model, fast.backend.layer_information())
    logging.getLogger(__name__).info("rounded on the CPU, never stored in FP16: %s", check["rounded_not_stored"])
    assert not check["stored_not_rounded"], check


def test_second_compile_hits_the_engine_cache(fp32, model, cache_dir, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="trtopt"):
        again = trtopt.compile(model, (torch.randn(4, 3, 32, 32),), backend="tensorrt", dynamic_shapes=DYNAMIC,
                               engine_cache_dir=cache_dir)
    assert "engine cache: hit" in caplog.text and "built TensorRT" not in caplog.text
    assert again.engine == fp32.engine


def test_several_profiles(model) -> None:
    fast = trtopt.compile(model, (torch.randn(4, 3, 32, 32),), backend="tensorrt",
                          dynamic_shapes=[{"x": {0: (1, 2, 4)}}, {"x": {0: (5, 8, 16)}}])
    for batch in (1, 4, 5, 16, 2, 9):  # switches profile back and forth
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        assert max_relative_error(fast(x), reference(model, x)) < FP32_RTOL
    with pytest.raises(trtopt.ShapeError):
        fast(torch.randn(17, 3, 32, 32, device="cuda"))


def test_cuda_graph_path_equals_plain_path(model, tmp_path) -> None:
    example = (torch.randn(4, 3, 32, 32),)
    plain = trtopt.compile(model, example, backend="tensorrt")
    # Built once: two builds may choose different tactics, and this compares at 1e-5.
    graphed = trtopt.load(plain.save(tmp_path / "plain.trtopt"), cuda_graph=True)
    assert graphed.engine == plain.engine
    first_x = torch.randn(4, 3, 32, 32, device="cuda")
    first = graphed(first_x)
    for _ in range(3):  # replays must read the new inputs
        x = torch.randn(4, 3, 32, 32, device="cuda")
        torch.testing.assert_close(graphed(x), plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first, plain(first_x), rtol=1e-5, atol=1e-5)  # not overwritten by replays
    assert graphed.backend._state().graph is not None


def test_several_threads_at_once(fp32) -> None:
    torch.manual_seed(2)
    inputs = [torch.randn(1 + i % 16, 3, 32, 32, device="cuda" if i % 2 else "cpu") for i in range(32)]
    expected = [fp32(x).cpu() for x in inputs]
    failures: list[str] = []
    barrier = threading.Barrier(4)

    def worker(offset: int) -> None:
        barrier.wait()
        for i in range(offset, len(inputs), 4):
            out = fp32(inputs[i])
            if inputs[i].is_cuda:
                torch.cuda.current_stream().synchronize()
            if not torch.allclose(out.cpu(), expected[i], rtol=1e-5, atol=1e-5):
                failures.append(f"input {i}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert fp32.backend.contexts_created >= 5  # the main thread's plus one per worker


def test_save_and_load_reuse_the_engine(fp32, model, tmp_path, caplog) -> None:
    path = fp32.save(tmp_path / "cnn.trtopt")
    with caplog.at_level(logging.INFO, logger="trtopt"):
        loaded = trtopt.load(path)
    assert loaded.backend_name == "tensorrt" and "built TensorRT" not in caplog.text
    x = torch.randn(3, 3, 32, 32, device="cuda")
    torch.testing.assert_close(loaded(x), fp32(x))


def test_layer_profile_and_inspector(fp32) -> None:
    times = fp32.backend.profile_layers({"x": torch.randn(4, 3, 32, 32, device="cuda")}, 0, runs=5)
    assert times and all(ms >= 0 for _, ms in times)
    info = fp32.backend.layer_information()
    assert info["Layers"], info


def test_calls_on_different_streams_in_turn(fp32, model) -> None:
    """One thread's execution context, launched on two torch streams and the pycuda stream in turn
    without synchronising in between: each launch waits for the previous one."""
    xs = [torch.randn(4, 3, 32, 32, device="cuda") for _ in range(3)]
    first = fp32(xs[0])  # the current stream, not synchronised
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs were made on the current stream
    with torch.cuda.stream(side):
        second = fp32(xs[1])
    third = fp32(xs[2].cpu())  # the pycuda stream
    side.synchronize()
    for x, y in zip(xs, (first, second, third)):
        assert max_relative_error(y.cpu(), reference(model, x)) < FP32_RTOL


def test_a_finished_threads_pycuda_state_is_freed_without_warnings(fp32, model) -> None:
    x = torch.randn(2, 3, 32, 32)
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worker = threading.Thread(target=lambda: results.append(fp32(x)))  # CPU input: pycuda buffers
        worker.start()
        worker.join()
        gc.collect()
    assert max_relative_error(results[0], reference(model, x)) < FP32_RTOL
    assert not [w for w in caught if "context" in str(w.message)], [str(w.message) for w in caught]


class _NonZeroModel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(x > 0)


def test_data_dependent_output_runs_on_tensorrt() -> None:
    """NonZero's output size depends on the values: TensorRT sizes it through trtopt's output allocator."""
    module = trtopt.compile(_NonZeroModel().eval(), (torch.randn(4, 8),), backend="tensorrt")
    assert module.backend.data_dependent
    for device in ("cuda", "cpu"):
        x = torch.randn(4, 8, device=device)
        torch.testing.assert_close(module(x).cpu(), torch.nonzero(x > 0).cpu())
