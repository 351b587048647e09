"""A streaming histogram of |x| in constant memory.

How it grows: it collects ``oversample`` (8) times finer than the 2048 bins the
entropy search uses: 16384 bins over ``[0, range]``. The first batch with a
non-zero value sets ``range = max|x|``. When a later batch holds a larger
value, the range doubles (as often as needed) and adjacent bins are summed
pairwise, as TensorRT's own calibrator grows its histogram ("the histogram
range is increased by a power of two", TensorRT developer guide). Those counts
stay exact: bin ``k`` holds ``[k w, (k+1) w)`` and one extra slot holds values
equal to the range's top, so the bin of ``x`` at width ``2^j w`` is
``floor(x / w) >> j`` (scaling a float by a power of two is exact), and the
streamed counts equal, bit for bit, one pass over all the data on the final
grid (tested).

TensorRT's doubling leaves up to half of its 2048 bins empty when it happens
late, which coarsens the entropy search and makes the result depend on batch
order (its guide warns about exactly this). trtopt avoids that: ``counts()``
resamples the fine histogram onto exactly 2048 bins over ``[0, max|x|]`` (the
histogram the entropy search is defined on, docs/calibration.md) by linear interpolation of the cumulative
counts. The fine bins are at most 1/4 of a final bin wide, so only the fine
bin straddling each final edge is split; one pass over the data (no doubling)
resamples exactly, by summing groups of 8 bins.
"""

from __future__ import annotations

import numpy as np

NUM_BINS = 2048
OVERSAMPLE = 8
# Above this 1/width is not a normal float32; index in float64 instead.
_FLOAT32_SAFE_SCALE = 1e36


class StreamingHistogram:
    """Histogram of |x|, updated one batch at a time; ``counts()`` gives 2048 bins over [0, max|x|]."""

    def __init__(self, num_bins: int = NUM_BINS, oversample: int = OVERSAMPLE, range_: float | None = None) -> None:
        fine = num_bins * oversample
        if num_bins < 2 or fine & (fine - 1):
            raise ValueError(f"num_bins * oversample = {fine} must be a power of two")
        self.num_bins = num_bins
        self.fine_bins = fine
        # One slot more than bins: fine_counts[fine] counts values exactly at the range's top.
        self.fine_counts = np.zeros(fine + 1, dtype=np.int64)
        self.range = 0.0 if range_ is None else float(range_)  # 0: no non-zero value seen yet
        self.max = 0.0  # the exact max |x| seen
        self.total = 0
        self.growths = 0  # how many times the range doubled

    @property
    def fine_width(self) -> float:
        return self.range / self.fine_bins

    @property
    def width(self) -> float:
        """Width of the bins ``counts()`` returns: max|x| / 2048."""
        return self.max / self.num_bins

    def counts(self) -> np.ndarray:
        """The histogram resampled onto ``num_bins`` bins over ``[0, max|x|]`` (float64 counts)."""
        if self.max == 0.0:
            out = np.zeros(self.num_bins)
            out[0] = self.total
            return out
        fine = self.fine_counts[:-1].astype(np.float64)
        fine[-1] += self.fine_counts[-1]  # the top of the range belongs to the last bin
        cumulative = np.concatenate(([0.0], np.cumsum(fine)))
        fine_edges = np.arange(self.fine_bins + 1, dtype=np.float64) * self.fine_width
        edges = np.arange(self.num_bins + 1, dtype=np.float64) * self.width
        out = np.diff(np.interp(edges, fine_edges, cumulative))
        # The fine bin holding max|x| is split at max by the interpolation, but all of it is <= max.
        out[-1] += self.total - out.sum()
        return out

    def clipped_share(self, amax: float) -> float:
        """The share of the values seen whose |x| exceeds ``amax`` (interpolated inside a fine bin)."""
        if self.total == 0 or amax >= self.max:
            return 0.0
        fine_edges = np.arange(self.fine_bins + 1, dtype=np.float64) * self.fine_width
        below = float(np.interp(amax, fine_edges, np.concatenate(([0.0], np.cumsum(self.fine_counts[:-1])))))
        return float(max(self.total - below, 0.0) / self.total)

    def is_discrete(self) -> bool:
        """True when most non-empty fine bins are isolated spikes (both neighbours empty).

        That is what a few distinct values look like (images with 256 or fewer levels
        normalised per channel, masks, one-hot, constants), and also a tensor seen in
        too few values to form a density. A continuous density seen in enough values
        fills runs of adjacent bins. Zeros (bin 0) are left out: a ReLU's zeros are a
        spike beside a continuous density.
        """
        occupied = self.fine_counts[1:] > 0
        if not occupied.any():
            return True
        padded = np.concatenate(([False], occupied, [False]))
        isolated = occupied & ~padded[:-2] & ~padded[2:]
        return int(isolated.sum()) * 2 > int(occupied.sum())

    def add(self, values: np.ndarray) -> float:
        """Add a batch; returns its max |x| (NaN if the batch holds a NaN, inf for an inf).

        Non-finite batches are not added: the caller reports them.
        """
        a = np.abs(np.asarray(values).ravel(), dtype=np.float32)
        if a.size == 0:
            return 0.0
        batch_max = float(a.max())
        if not np.isfinite(batch_max):
            return batch_max
        if batch_max > self.range:
            if self.range == 0.0:
                self.range = batch_max  # zeros seen so far are already in bin 0, which stays bin 0
            else:
                self._grow(batch_max)
        self.max = max(self.max, batch_max)
        self.total += a.size
        if self.range == 0.0:
            self.fine_counts[0] += a.size
            return batch_max
        scale = self.fine_bins / self.range
        if scale > _FLOAT32_SAFE_SCALE:
            a = a.astype(np.float64)
        np.multiply(a, scale, out=a)
        # Truncation is floor here (a >= 0); a <= range, so the index is at most fine_bins (the top slot).
        counts = np.bincount(a.astype(np.intp), minlength=self.fine_bins + 1)
        if counts.size > self.fine_bins + 1:  # float rounding past the top: still the top
            counts[self.fine_bins] += counts[self.fine_bins + 1 :].sum()
            counts = counts[: self.fine_bins + 1]
        self.fine_counts += counts
        return batch_max

    def _grow(self, needed: float) -> None:
        doublings = 0
        new_range = self.range
        while new_range < needed:
            new_range *= 2.0
            doublings += 1
        # Bin k at the old width lies inside bin k >> doublings at the new one.
        target = np.arange(self.fine_bins + 1) >> doublings  # the top slot lands inside the new range
        self.fine_counts = np.bincount(target, weights=self.fine_counts, minlength=self.fine_bins + 1).astype(
            np.int64
        )
        self.range = new_range
        self.growths += doublings
