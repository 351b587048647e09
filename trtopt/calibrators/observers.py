"""Observers turn a stream of activation batches into one amax (range) per tensor.

* ``minmax``: amax = max |x|.
* ``percentile``: amax = the upper edge of the histogram bin holding the given
  percentile of |x| (never above max |x|, so 100 equals minmax).
* ``entropy``: TensorRT's EntropyCalibration2 search (DESIGN.md §5) over the
  2048-bin histogram of |x|. For every candidate cut ``i`` in 128..2048:

  - P = the first ``i`` bins, with the mass beyond them (the outliers) folded
    into bin ``i-1``;
  - Q = the first ``i`` bins merged into 128 equal-width levels (bin ``b`` goes
    to level ``floor(128 b / i)``), each level's mass spread evenly over its
    non-empty source bins (empty bins stay empty);
  - both normalised; the cut with the least KL(P || Q) wins (the first, on a
    tie), and amax = ``i * bin width``, the top of the kept range (the
    histogram spans exactly [0, max |x|], so ``i = 2048`` gives max |x|).

  Before the search, bin 0 takes bin 1's count, as NVIDIA's reference
  implementation (pytorch-quantization's ``_compute_amax_entropy``) does: the
  exact zeros a ReLU produces (half of its output) would otherwise dominate the
  KL and clip the range far too low.

  Where bin ``i-1`` is empty but outliers are folded into it, Q is 0 where P is
  not and KL is infinite: that cut is never chosen. The cut ``i = 2048`` always
  has a finite KL, so a threshold always exists.

The search is vectorized: with p = counts / total, the KL of cut ``i`` is

    KL_i = sum_{b<i-1} p_b log p_b + s_i log s_i
           - sum_levels m log(m / n) - o_i log(m_last / n_last) + log c_i

where s_i = p_{i-1} + o_i (bin i-1 plus the outliers o_i), m and n are each
level's mass and number of non-empty bins, and c_i = sum_{b<i} p_b (Q's total
before normalising). Every sum is a difference of prefix sums, so all 1921
candidates cost one (1921 x 129) gather instead of a Python loop. The tests
keep a loop-by-loop transcription of the published algorithm and check that
both pick the same cut.
"""

from __future__ import annotations

import numpy as np

from ..errors import CalibrationError
from .histogram import NUM_BINS, StreamingHistogram

NUM_LEVELS = 128  # 8-bit symmetric: 127 positive levels plus zero, as TensorRT counts them


def _xlogx(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def entropy_divergences(counts: np.ndarray, num_levels: int = NUM_LEVELS) -> np.ndarray:
    """KL(P || Q) for every cut ``i`` in ``num_levels..len(counts)`` (index 0 is cut ``num_levels``)."""
    h = np.asarray(counts, dtype=np.float64)
    n = h.size
    if n < num_levels:
        raise ValueError(f"need at least {num_levels} bins, got {n}")
    p = h / h.sum()
    cuts = np.arange(num_levels, n + 1)
    mass = np.concatenate(([0.0], np.cumsum(p)))  # mass[k] = sum p[:k]
    outliers = np.concatenate((np.cumsum(p[::-1])[::-1], [0.0]))[cuts]  # sum p[i:]
    nonempty = np.concatenate(([0], np.cumsum(h > 0)))
    plogp = np.concatenate(([0.0], np.cumsum(_xlogx(p))))

    # Level l of cut i covers bins [ceil(l i / L), ceil((l+1) i / L)).
    level = np.arange(num_levels + 1)
    bounds = (np.outer(cuts, level) + num_levels - 1) // num_levels
    level_mass = np.diff(mass[bounds], axis=1)
    level_nonempty = np.diff(nonempty[bounds], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.where(level_nonempty > 0, level_mass / np.maximum(level_nonempty, 1), 0.0)
        cross = np.where(level_mass > 0, level_mass * np.log(np.where(spread > 0, spread, 1.0)), 0.0)
        # Bin i-1 is always in the last level; the outliers sit in P there, Q spreads no mass to them.
        last_q = spread[:, -1]
        outlier_cross = np.where(outliers > 0, outliers * np.log(np.where(last_q > 0, last_q, 1.0)), 0.0)
        kl = (
            plogp[cuts - 1]
            + _xlogx(p[cuts - 1] + outliers)
            - cross.sum(axis=1)
            - outlier_cross
            + np.log(mass[cuts])
        )
    kl[(outliers > 0) & (h[cuts - 1] == 0)] = np.inf
    return kl


def entropy_cut(counts: np.ndarray, num_levels: int = NUM_LEVELS) -> int:
    """The number of bins ``i`` TensorRT's entropy search keeps (the first cut of least KL)."""
    return num_levels + int(np.argmin(entropy_divergences(counts, num_levels)))


class MinMaxObserver:
    """amax = max |x| over all batches; no histogram needed."""

    def __init__(self) -> None:
        self.max = 0.0
        self.seen = False

    def update(self, values: np.ndarray) -> float:
        values = np.asarray(values)
        if values.size == 0:
            return 0.0
        batch_max = float(np.max(np.abs(values)))
        if np.isfinite(batch_max):
            self.max = max(self.max, batch_max)
            self.seen = True
        return batch_max

    def amax(self) -> float:
        return self.max


class HistogramObserver:
    """Streams |x| into a 2048-bin histogram; amax by entropy or percentile."""

    def __init__(self, method: str, percentile: float = 99.99, num_bins: int = NUM_BINS) -> None:
        if method not in ("entropy", "percentile"):
            raise ValueError(f"HistogramObserver method {method!r}; use 'entropy' or 'percentile'")
        self.method = method
        self.percentile = float(percentile)
        self.histogram = StreamingHistogram(num_bins)

    @property
    def seen(self) -> bool:
        return self.histogram.total > 0

    def update(self, values: np.ndarray) -> float:
        return self.histogram.add(values)

    def amax(self) -> float:
        hist = self.histogram
        if hist.max == 0.0:
            return 0.0  # every value was zero
        counts = hist.counts()
        if self.method == "entropy":
            if counts[1:].any():
                # As NVIDIA's reference (pytorch-quantization's _compute_amax_entropy) does: bin 0
                # takes bin 1's count. After a ReLU half the values are exact zeros; that spike
                # otherwise dominates the KL and clips the range far too low (a digits CNN fell
                # from 99% to 23-69% top-1 at INT8 without this).
                counts = counts.copy()
                counts[0] = counts[1]
            cut = entropy_cut(counts)
        else:
            cumulative = np.cumsum(counts)
            cut = int(np.searchsorted(cumulative, self.percentile / 100.0 * cumulative[-1], side="left")) + 1
        return min(cut * hist.width, hist.max)


def make_observer(method: str, percentile: float = 99.99) -> MinMaxObserver | HistogramObserver:
    if method == "minmax":
        return MinMaxObserver()
    if method in ("entropy", "percentile"):
        return HistogramObserver(method, percentile)
    raise CalibrationError(f"unknown calibration method {method!r}; use 'entropy', 'minmax' or 'percentile'")
