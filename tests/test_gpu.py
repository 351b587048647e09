"""Real TensorRT engines on a real GPU (tier 2). Run with ``pytest -m gpu`` on a machine with an
NVIDIA GPU, TensorRT 10 or 11, pycuda and a CUDA build of torch; skipped with the reason elsewhere.

Every test compiles real models through ``trtopt.compile(..., backend="tensorrt")`` and compares
with the torch model on the same inputs.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import trtopt
from trtopt import _deps

from ._models import ResidualCNN
from .helpers import max_relative_error


def _unavailable() -> str | None:
    reason = _deps.tensorrt_unavailable_reason()
    if reason is None and not torch.cuda.is_available():
        reason = "torch was installed without CUDA support"
    return reason


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_unavailable() is not None, reason=f"{_unavailable()}")]

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
    assert max_relative_error(y, reference(model, x)) < 5e-3  # TF32 may be used for FP32 math


def test_numpy_in_numpy_out(fp32, model) -> None:
    x = torch.randn(2, 3, 32, 32)
    y = fp32(x.numpy())
    assert max_relative_error(torch.from_numpy(y), reference(model, x)) < 5e-3


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
        assert max_relative_error(fast(x), reference(model, x)) < 5e-3
    with pytest.raises(trtopt.ShapeError):
        fast(torch.randn(17, 3, 32, 32, device="cuda"))


def test_cuda_graph_path_equals_plain_path(model) -> None:
    example = (torch.randn(4, 3, 32, 32),)
    plain = trtopt.compile(model, example, backend="tensorrt")
    graphed = trtopt.compile(model, example, backend="tensorrt", cuda_graph=True)
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
