"""Latency measurement: the clock each call is timed with, and callables timed side by side in alternating blocks."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import ConfigError
from .memory import MemoryUsage, PeakMemory, most_demanding
from .stats import LatencyStats

logger = logging.getLogger(__name__)


def is_cuda(obj: Any) -> bool:
    """True when any tensor in a (nested) input or output lives on a CUDA device."""
    if isinstance(obj, torch.Tensor):
        return obj.is_cuda
    if isinstance(obj, Mapping):
        return any(is_cuda(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return any(is_cuda(v) for v in obj)
    return False


def _timer(fn: Callable[[], Any], on_cuda: bool) -> tuple[Callable[[], float], str]:
    """A function that calls ``fn`` once and returns its latency in ms, and the clock's name."""
    if on_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed() -> float:
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

        return timed, "cuda-event"

    def timed_cpu() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0

    return timed_cpu, "perf_counter"


def measure_side_by_side(
    fns: Sequence[Callable[..., Any]],
    make_inputs: Callable[[int], Sequence[Any]],
    batch_sizes: Iterable[int],
    *,
    warmup: int,
    iterations: int,
    rounds: int = 5,
) -> tuple[list[list[LatencyStats]], list[MemoryUsage | None]]:
    """Latency of each ``fn(*make_inputs(b))`` at each batch size, measured in alternating blocks.

    All callables get the same inputs. After each one's warm-up, the timed
    calls are split into ``rounds`` blocks; each round runs one block of every
    callable (the starting callable rotating). Load from other processes and
    clock drift then fall on every callable alike, so the ratios between them
    stay fair on a busy machine. Each block starts with one untimed call: the
    previous callable's thread pool (ONNX Runtime and OpenMP threads spin for
    a while after their work) may still hold a core, and caches are cold.
    Peak memory is taken per callable around its warm-up calls; the batch
    size whose calls grew RSS most is kept. Returns ``(stats, memory)``, one
    entry per callable.
    """
    if warmup < 1:
        raise ConfigError(
            f"warmup={warmup}; use at least 1: the first call pays one-off costs and picks the clock"
        )
    if iterations < 1:
        raise ConfigError(f"iterations={iterations}; use at least 1 (20 or more for a stable p99)")
    if rounds < 1:
        raise ConfigError(f"rounds={rounds}; use at least 1")
    rounds = min(rounds, iterations)
    blocks = [iterations // rounds + (1 if r < iterations % rounds else 0) for r in range(rounds)]
    stats: list[list[LatencyStats]] = [[] for _ in fns]
    memory: list[MemoryUsage | None] = [None for _ in fns]
    for batch in batch_sizes:
        inputs = tuple(make_inputs(batch))
        calls = [functools.partial(fn, *inputs) for fn in fns]
        timers = []
        for index, call in enumerate(calls):
            with PeakMemory(cuda=is_cuda(inputs)) as peak:
                for _ in range(warmup):
                    out = call()
            on_cuda = is_cuda(out)
            if on_cuda:
                torch.cuda.synchronize()
            timers.append(_timer(call, on_cuda))
            memory[index] = most_demanding(memory[index], peak.usage)
        samples: list[list[float]] = [[] for _ in fns]
        for round_, block in enumerate(blocks):
            for k in range(len(fns)):
                index = (round_ + k) % len(fns)
                calls[index]()  # settle: see the docstring
                samples[index] += [timers[index][0]() for _ in range(block)]
        for index, (_, clock) in enumerate(timers):
            stats[index].append(LatencyStats.from_samples(samples[index], batch, clock))
        logger.debug("batch %d: p50 %s ms", batch, ", ".join(f"{s[-1].p50_ms:.2f}" for s in stats))
    return stats, memory


def measure_latency(
    fn: Callable[..., Any],
    make_inputs: Callable[[int], Sequence[Any]],
    batch_sizes: Iterable[int],
    *,
    warmup: int,
    iterations: int,
) -> list[LatencyStats]:
    """Latency statistics of ``fn(*make_inputs(b))`` for each batch size ``b`` (one callable)."""
    stats, _ = measure_side_by_side([fn], make_inputs, batch_sizes, warmup=warmup, iterations=iterations)
    return stats[0]
