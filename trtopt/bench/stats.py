"""Latency statistics: percentiles by one stated method, and the per-batch-size summary of a run's samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from ..errors import InputError

PERCENTILE_METHOD: Final = "linear"  # numpy's default, Hyndman-Fan type 7
# p90 above this multiple of p50: a tenth of the calls took half as long again as the median, so
# something else was using the cores and one run's ratios may not repeat (a shared or busy machine).
UNSTABLE_SPREAD = 1.5


def percentiles(samples: Sequence[float] | np.ndarray, qs: Sequence[float] = (50, 90, 99)) -> list[float]:
    """The ``qs`` percentiles of ``samples`` by linear interpolation (see the module docstring)."""
    data = np.asarray(samples, dtype=np.float64)
    if data.size == 0:
        raise InputError("cannot take percentiles of no samples; run at least one iteration")
    return [float(v) for v in np.percentile(data, qs, method=PERCENTILE_METHOD)]


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one call at one batch size, in milliseconds."""

    batch_size: int
    iterations: int
    clock: str  # "cuda-event" or "perf_counter"
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    throughput_per_s: float  # samples per second at the median latency

    @property
    def spread(self) -> float:
        """p90 / p50: how much slower the slowest tenth of the calls were than the median."""
        return self.p90_ms / self.p50_ms if self.p50_ms > 0 else math.inf

    @property
    def unstable(self) -> bool:
        return self.spread > UNSTABLE_SPREAD

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], batch_size: int, clock: str) -> LatencyStats:
        data = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = percentiles(data)
        return cls(
            batch_size=batch_size,
            iterations=int(data.size),
            clock=clock,
            mean_ms=float(data.mean()),
            std_ms=float(data.std()),
            min_ms=float(data.min()),
            p50_ms=p50,
            p90_ms=p90,
            p99_ms=p99,
            max_ms=float(data.max()),
            throughput_per_s=batch_size * 1000.0 / p50 if p50 > 0 else math.inf,
        )
