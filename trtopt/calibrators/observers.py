"""Observers turn a stream of activation batches into one amax (range) per tensor.

Every method (``minmax``, ``percentile``, ``mse``, ``entropy``: TensorRT's
EntropyCalibration2 with its bin-0, tie and discrete-data rules, and ``auto``)
reads the same streamed 2048-bin histogram of |x| (``histogram``), so every
chosen range can be checked the same way (``RangeCheck``: the share of values it
clips and its expected quantization error). docs/design.md section 5 gives each
method and rule, and why.
"""

from __future__ import annotations

import numpy as np

from dataclasses import asdict, dataclass

from ..config import DEFAULT_PERCENTILE, calibrator_name
from .histogram import NUM_BINS, StreamingHistogram

NUM_LEVELS = 128  # 8-bit symmetric: 127 positive levels plus zero, as TensorRT counts them
QMAX = 127  # symmetric INT8: q in [-127, 127], scale = amax / 127
FIRST_CUT = 128  # the narrowest range any histogram method may pick: 128 of 2048 bins
ENTROPY_TIE_TOLERANCE = 1e-9  # nats; KL values closer than this to the least are ties
AUTO_MAX_CLIPPED = 1e-3  # auto never picks a range clipping more than this share of |x|


def _xlogx(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def entropy_divergences(counts: np.ndarray, num_levels: int = NUM_LEVELS) -> np.ndarray:
    """KL(P || Q) for every cut ``i`` in ``num_levels..len(counts)`` (index 0 is cut ``num_levels``).

    Vectorized: with p = counts / total, the KL of cut ``i`` is

        KL_i = sum_{b<i-1} p_b log p_b + s_i log s_i
               - sum_levels m log(m / n) - o_i log(m_last / n_last) + log c_i

    where s_i = p_{i-1} + o_i (bin i-1 plus the outliers o_i), m and n are each
    level's mass and number of non-empty bins, and c_i = sum_{b<i} p_b (Q's total
    before normalising). Every sum is a difference of prefix sums, so all 1921
    candidates cost one (1921 x 129) gather instead of a Python loop; the tests
    check it against loop-by-loop transcriptions of the published algorithm and of
    NVIDIA's code. Where bin ``i-1`` is empty but outliers are folded into it, Q is
    0 where P is not and KL is infinite: that cut is never chosen. The full cut
    always has a finite KL, so a threshold always exists.
    """
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
    """The number of bins ``i`` the entropy search keeps: the widest cut of least KL, up to ties."""
    kl = entropy_divergences(counts, num_levels)
    ties = np.flatnonzero(kl <= kl.min() + ENTROPY_TIE_TOLERANCE)
    return num_levels + int(ties[-1])


def _fake_quantize(values: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """Symmetric INT8 round trip of ``values`` (>= 0) for each amax (rows), as TensorRT computes it."""
    scale = amax / QMAX
    return np.minimum(np.rint(values / scale), QMAX) * scale  # np.rint rounds half to even


def quantization_errors(counts: np.ndarray, width: float, amaxes: np.ndarray) -> np.ndarray:
    """Expected squared error per value of quantizing the histogram with each of ``amaxes``.

    Each bin stands for its centre, as pytorch-quantization's ``_compute_amax_mse`` does;
    empty bins cost nothing and are skipped. Rows go in blocks so memory stays at a few MB.
    """
    counts = np.asarray(counts, dtype=np.float64)
    occupied = np.flatnonzero(counts)
    centres = (occupied + 0.5) * width
    weights = counts[occupied] / counts.sum()
    amaxes = np.asarray(amaxes, dtype=np.float64)
    errors = np.empty(amaxes.size)
    for start in range(0, amaxes.size, 256):
        block = amaxes[start : start + 256, None]
        squared = (_fake_quantize(centres, block) - centres) ** 2
        errors[start : start + 256] = squared @ weights
    return errors


_MSE_STRIDE = 8  # coarse step of the MSE search; the best coarse cut is then refined bin by bin


def mse_cut(counts: np.ndarray, width: float) -> int:
    """The cut ``i`` (amax = i * width) of least expected quantization error; the widest on a tie.

    Coarse to fine: every 8th cut from 128 to 2048, then each cut within 8 of the best
    one. The full sweep costs 8 times more; on every histogram in the tests this one's
    error is within 1% of the full sweep's least (the curve is smooth at that scale on
    continuous data).
    """
    last = len(counts)

    def best(cuts: np.ndarray) -> int:
        errors = quantization_errors(counts, width, cuts * width)
        ties = np.flatnonzero(errors <= errors.min() * (1 + 1e-12))
        return int(cuts[ties[-1]])

    coarse = best(np.unique(np.append(np.arange(FIRST_CUT, last + 1, _MSE_STRIDE), last)))
    return best(np.arange(max(FIRST_CUT, coarse - _MSE_STRIDE), min(last, coarse + _MSE_STRIDE) + 1))


@dataclass(frozen=True)
class RangeCheck:
    """What a chosen range costs one tensor, read from its histogram.

    ``clipped``: the share of values with |x| > amax. ``error``: the expected
    quantization error relative to the tensor's own size, sqrt(E[(q(x) - x)^2] /
    E[x^2]) (0.01 means the INT8 values are off by 1% of the tensor's RMS).
    """

    method: str
    amax: float
    clipped: float
    error: float

    def to_json(self) -> dict[str, float | str]:
        return asdict(self)


class HistogramObserver:
    """Streams |x| into a 2048-bin histogram; amax by any method, and the check of that range."""

    def __init__(
        self, method: str, percentile: float = DEFAULT_PERCENTILE, num_bins: int = NUM_BINS, channels: bool = False
    ) -> None:
        self.method = calibrator_name(method)
        self.percentile = float(percentile)
        self.histogram = StreamingHistogram(num_bins)
        # max |x| per channel of the last axis (SmoothQuant's statistic), when asked for
        self.channel_max: np.ndarray | None = np.zeros(0) if channels else None
        # The signed extent (min, max) over every batch: int8_layout="cpu" narrows [-amax, amax] to it.
        self.extent: tuple[float, float] | None = None
        self._chosen: RangeCheck | None = None

    def update(self, values: np.ndarray) -> float:
        self._chosen = None
        batch_max = self.histogram.add(values)
        if np.isfinite(batch_max) and np.size(values):
            low, high = float(np.min(values)), float(np.max(values))
            self.extent = (low, high) if self.extent is None else (min(self.extent[0], low), max(self.extent[1], high))
        if self.channel_max is not None and np.isfinite(batch_max) and np.ndim(values) and np.size(values):
            per_channel = np.abs(np.asarray(values).reshape(-1, np.shape(values)[-1])).max(axis=0).astype(np.float64)
            self.channel_max = per_channel if self.channel_max.size == 0 else np.maximum(self.channel_max, per_channel)
        return batch_max

    def amax(self) -> float:
        return self.check().amax

    def check(self) -> RangeCheck:
        """The range this observer's method picks, with its clipped share and error."""
        if self._chosen is None:
            self._chosen = self._choose()
        return self._chosen

    def _choose(self) -> RangeCheck:
        hist = self.histogram
        if hist.max == 0.0:
            return RangeCheck(self.method, 0.0, 0.0, 0.0)  # every value was zero
        counts = hist.counts()
        if self.method != "auto":
            return self._check(counts, self.method, self._amax(counts, self.method))
        candidates = [self._check(counts, m, self._amax(counts, m)) for m in ("entropy", "percentile", "mse", "minmax")]
        allowed = [c for c in candidates if c.clipped <= AUTO_MAX_CLIPPED]  # minmax clips nothing
        best = min(allowed, key=lambda c: (c.error, -c.amax))
        return RangeCheck(f"auto:{best.method}", best.amax, best.clipped, best.error)

    def _amax(self, counts: np.ndarray, method: str) -> float:
        hist = self.histogram
        if method == "minmax":
            return hist.max
        if method == "percentile":
            cumulative = np.cumsum(counts)
            cut = int(np.searchsorted(cumulative, self.percentile / 100.0 * cumulative[-1], side="left")) + 1
        elif method == "mse":
            cut = mse_cut(counts, hist.width)
        elif hist.is_discrete():
            return hist.max  # see the module docstring: the KL search assumes a continuous density
        else:
            if counts[1:].any():
                # As NVIDIA's reference (pytorch-quantization's _compute_amax_entropy) does: bin 0
                # takes bin 1's count. After a ReLU half the values are exact zeros; that spike
                # otherwise dominates the KL and clips the range far too low (a digits CNN fell
                # from 99% to 23-69% top-1 at INT8 without this).
                counts = counts.copy()
                counts[0] = counts[1]
            cut = entropy_cut(counts)
        return min(cut * hist.width, hist.max)

    def check_range(self, amax: float, method: str) -> RangeCheck:
        """What ``amax`` (chosen elsewhere, e.g. read from a cache) costs on the data seen."""
        if self.histogram.max == 0.0:
            return RangeCheck(method, float(amax), 0.0, 0.0)
        return self._check(self.histogram.counts(), method, amax)

    def _check(self, counts: np.ndarray, method: str, amax: float) -> RangeCheck:
        hist = self.histogram
        centres = (np.arange(counts.size) + 0.5) * hist.width
        mean_square = float(counts @ centres**2) / hist.total
        error = float(quantization_errors(counts, hist.width, np.array([amax]))[0])
        relative = float(np.sqrt(error / mean_square)) if mean_square > 0 else 0.0
        return RangeCheck(method, float(amax), hist.clipped_share(amax), relative)


def make_observer(method: str, percentile: float = DEFAULT_PERCENTILE, channels: bool = False) -> HistogramObserver:
    return HistogramObserver(method, percentile, channels=channels)
