"""The runtime's CUDA side against real CUDA, with TensorRT replaced by a double (tier 2, marked gpu).

Needs a CUDA build of torch, an NVIDIA GPU and pycuda, but not TensorRT: ``CudaExecutionContext``
below is a test double of ``trt.IExecutionContext`` (tests/trt_doubles.py's ``FakeExecutionContext``
for binding, shapes and profiles) whose launch is real GPU work on the stream TensorRT would be
given: ``y = 2 * x + 1`` read and written at the bound device addresses, after a ``torch.cuda._sleep``
so that a launch not ordered after the work it depends on reads stale memory and fails the
comparison. It checks our per-thread pycuda contexts and buffers, stream ordering, the legacy
default stream's side stream, CUDA-graph capture and replay (the double's kernels are captured
like TensorRT's) and the output allocator with real allocations. tools/gpu_check.sh runs it;
tests/test_gpu.py checks real engines where TensorRT is installed.
"""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch

from trtopt import _deps
from trtopt.runtime import TensorRTBackend

from .helpers import ENGINE, ENGINE_DD, SPEC, SPEC_DD, graph_backend
from .trt_doubles import FakeEngine, FakeExecutionContext, FakeTensorRT


def _unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "torch has no CUDA device here"
    if _deps._import("pycuda.driver") is None:
        return "pycuda is not installed (tools/gpu_check.sh installs it)"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_unavailable() is not None, reason=f"{_unavailable()}")]

SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU time before each launch writes: unordered reads see stale data


def _device_view(address: int, count: int) -> torch.Tensor:
    """A float32 torch view of ``count`` elements at a raw device address (no copy, no ownership)."""

    class Pointer:
        __cuda_array_interface__ = {"shape": (count,), "typestr": "<f4", "data": (int(address), False), "version": 2}

    return torch.as_tensor(Pointer(), device="cuda")


class CudaExecutionContext(FakeExecutionContext):
    """Double of ``trt.IExecutionContext`` whose launches are real kernels on the given stream.

    ``set_optimization_profile_async`` raises RuntimeError on a refused index and otherwise returns
    True, as TensorRT's pyCore.cpp binds it; data-dependent outputs are sized through the
    ``IOutputAllocator`` set for them, before ``execute_async_v3`` returns, as enqueueV3 does.
    """

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile async.")
        self.profile = index
        return True

    def execute_async_v3(self, stream: int) -> bool:
        external = torch.cuda.ExternalStream(int(stream))
        data_dependent = set(self.engine.plan.get("data_dependent", ()))
        with torch.cuda.stream(external):
            torch.cuda._sleep(SLEEP_CYCLES)
            for out, inp in self.engine.output_of.items():
                count = 1
                for d in self.shapes[inp]:
                    count *= d
                x = _device_view(self.addresses[inp], count)
                if out in data_dependent:
                    external.synchronize()  # enqueueV3 waits to learn the size
                    y_values = 2 * x[x > 0] + 1
                    allocator = self.allocators[out]
                    address = allocator.reallocate_output_async(out, 0, max(y_values.numel() * 4, 1), 256, int(stream))
                    allocator.notify_shape(out, (y_values.numel(),))
                    if y_values.numel():
                        _device_view(address, y_values.numel()).copy_(y_values)
                    continue
                y = _device_view(self.addresses[out], count)
                torch.mul(x, 2, out=y)
                y.add_(1)
        self.executions += 1
        return True


@pytest.fixture()
def cuda_double(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    """TensorRT replaced by the double; pycuda and torch.cuda are the real ones."""
    trt = FakeTensorRT()
    monkeypatch.setattr(_deps, "tensorrt", lambda: trt)
    monkeypatch.setattr(FakeEngine, "create_execution_context", lambda engine: CudaExecutionContext(engine))
    return trt


def expected(x: torch.Tensor) -> torch.Tensor:
    return 2 * x + 1


def test_host_inputs_from_several_threads_with_pycuda_buffers(cuda_double) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    failures: list[str] = []

    def worker(seed: int) -> None:
        for step in range(10):
            x = torch.full((1 + (seed + step) % 8, 4), float(seed * 100 + step))
            if not torch.equal(backend.run({"x": x}, 0)[0], expected(x)):
                failures.append(f"thread {seed} step {step}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gc.collect()
    assert failures == []
    assert backend.contexts_created == 5
    assert not [w for w in caught if "context" in str(w.message)], [str(w.message) for w in caught]


def test_calls_on_different_streams_are_ordered(cuda_double) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    xs = [torch.rand(4, 4, device="cuda") for _ in range(3)]
    torch.cuda.synchronize()
    first = backend.run({"x": xs[0]}, 0)[0]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        second = backend.run({"x": xs[1]}, 0)[0]
    third = backend.run({"x": xs[2].cpu()}, 0)[0]  # the pycuda stream
    torch.cuda.synchronize()
    for x, y in zip(xs, (first, second, third)):
        torch.testing.assert_close(y.cpu(), expected(x).cpu())


def test_the_legacy_default_stream_uses_a_side_stream(cuda_double) -> None:
    backend = TensorRTBackend(ENGINE, SPEC)
    x = torch.rand(4, 4, device="cuda")
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    (y,) = backend.run({"x": x}, 0)
    z = y * 1  # queued on the default stream: must run after the side stream's launch
    torch.cuda.current_stream().synchronize()
    torch.testing.assert_close(z, expected(x))
    assert backend._state().side_stream is not None


def test_cuda_graph_replays_new_inputs_and_recaptures_new_shapes(cuda_double) -> None:
    backend = graph_backend()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xs = [torch.rand(4, 4, device="cuda") for _ in range(3)] + [torch.rand(2, 4, device="cuda")]
        outs = [backend.run({"x": x}, 0)[0] for x in xs]
    torch.cuda.synchronize()
    for x, y in zip(xs, outs):
        torch.testing.assert_close(y, expected(x))
    assert not backend.graph_unsupported and backend._state().graph.key[1] == (("x", (2, 4)),)


def test_first_captures_on_several_threads_keep_graphs_on(cuda_double) -> None:
    backend = graph_backend()
    failures: list[str] = []
    barrier = threading.Barrier(3)

    def worker(seed: int) -> None:
        barrier.wait()
        with torch.cuda.stream(torch.cuda.Stream()):
            x = torch.full((4, 4), float(seed), device="cuda")
            y = backend.run({"x": x}, 0)[0]
            torch.cuda.current_stream().synchronize()
        if not torch.equal(y, expected(x)):
            failures.append(str(seed))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and not backend.graph_unsupported


def test_data_dependent_outputs_through_the_output_allocator(cuda_double) -> None:
    backend = TensorRTBackend(ENGINE_DD, SPEC_DD)
    for device in ("cuda", "cpu"):
        x = torch.randn(6, 4, device=device)
        (y,) = backend.run({"x": x}, 0)
        torch.cuda.synchronize()
        torch.testing.assert_close(y.cpu(), (2 * x[x > 0] + 1).cpu())
