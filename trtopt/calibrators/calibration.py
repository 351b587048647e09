"""``calibrate``: activation ranges for INT8, from data or from a TensorRT calibration cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..config import DEFAULT_CALIBRATORS, DEFAULT_PERCENTILE, CalibratorKind, Precision, calibrator_name
from ..errors import CalibrationError
from .cache import algorithm_name, channel_path, read_cache, read_channel_max, write_cache, write_channel_max
from .collect import collect
from .data import CalibrationData, Progress, expected_batches, iter_batches
from .observers import HistogramObserver, RangeCheck, make_observer

if TYPE_CHECKING:
    from ..spec import TensorSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationResult:
    """Per-tensor ranges. ``num_batches`` is 0 when the ranges came from a cache.

    ``checks`` holds, per tensor measured on data, the share of values its range
    clips and its expected quantization error (empty for ranges from a cache).
    ``channel_max`` holds max |x| per channel of the last axis of the tensors
    asked for with ``channel_max_for`` (SmoothQuant's statistic). ``extents`` holds
    each tensor's observed (min, max), for ``int8_layout="cpu"`` (empty from a cache,
    whose TensorRT format keeps symmetric scales only). ``peaks`` holds max |x| of the
    tensors asked for with ``peaks_for`` (``math.inf`` where one held Inf or NaN; empty
    from a cache).
    """

    amax: dict[str, float]
    method: str
    num_batches: int
    from_cache: bool = False
    checks: dict[str, RangeCheck] = field(default_factory=dict)
    channel_max: dict[str, np.ndarray] = field(default_factory=dict)  # for channel_max_for
    extents: dict[str, tuple[float, float]] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)  # for peaks_for

    def scales(self) -> dict[str, float]:
        """INT8 scale per tensor: amax / 127 (symmetric quantization, docs/precision.md)."""
        return {name: amax / 127.0 for name, amax in self.amax.items()}


def _from_cache(
    path: Path, names: Sequence[str], method: str, algorithm: str, channel_names: Sequence[str]
) -> CalibrationResult | None:
    """The cached ranges when the cache fits this run; None (with a warning) when it does not."""
    cache = read_cache(path)  # a file that is no cache at all raises: never overwrite it
    if cache.algorithm != algorithm:
        logger.warning(
            "calibration cache %s holds %s ranges but this run asks for %s; recalibrating and "
            "overwriting it",
            path, cache.algorithm, algorithm,
        )
        return None
    missing = [n for n in names if n not in cache.scales]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        logger.warning(
            "calibration cache %s lacks %d of the %d tensors this model needs (%s): it was written for "
            "another model or graph; recalibrating and overwriting it",
            path, len(missing), len(names), shown,
        )
        return None
    channel_max = read_channel_max(path) if channel_names else {}
    if any(n not in channel_max for n in channel_names):
        logger.warning(
            "calibration cache %s has no per-channel statistics (%s) for SmoothQuant; recalibrating and "
            "overwriting it", path, channel_path(path).name,
        )
        return None
    amax = cache.amax()
    logger.info("calibration: using %d ranges from cache %s", len(names), path)
    return CalibrationResult(
        {n: amax[n] for n in names}, method, 0, from_cache=True, channel_max={n: channel_max[n] for n in channel_names}
    )


def calibrate(
    onnx_model: onnx.ModelProto,
    tensor_names: Sequence[str],
    calibration_data: CalibrationData | None,
    *,
    input_specs: Sequence[TensorSpec],
    method: CalibratorKind | str = DEFAULT_CALIBRATORS[Precision.INT8],
    percentile: float = DEFAULT_PERCENTILE,
    max_batches: int | None = None,
    cache_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    channel_max_for: Sequence[str] = (),
    peaks_for: Sequence[str] = (),
) -> CalibrationResult:
    """Measure the range (amax) of each tensor in ``tensor_names`` over ``calibration_data``.

    ``channel_max_for`` (a subset of ``tensor_names``) also get max |x| per channel
    of their last axis, in the same pass. ``peaks_for`` (any tensors: the FP16 float part's
    probe) get max |x|, in the same pass too. The accepted data forms are ``data``'s;
    the cache rules are in docs/calibration.md ("The calibration cache").
    """
    method = calibrator_name(method)
    if not 0.0 < float(percentile) <= 100.0:
        raise CalibrationError(f"percentile={percentile!r} must be in (0, 100], e.g. {DEFAULT_PERCENTILE:g}")
    names = list(dict.fromkeys(tensor_names))
    if not names:
        raise CalibrationError("tensor_names is empty; name the activations to calibrate")
    graph_inputs = {vi.name for vi in onnx_model.graph.input} - {t.name for t in onnx_model.graph.initializer}
    unknown = [s.name for s in input_specs if s.name not in graph_inputs]
    missing = sorted(graph_inputs - {s.name for s in input_specs})
    if unknown or missing:
        raise CalibrationError(
            f"input_specs do not match the graph's inputs {sorted(graph_inputs)} "
            f"(unknown: {unknown}, missing: {missing})"
        )
    algorithm = algorithm_name(method, percentile)
    path = Path(cache_path) if cache_path is not None else None
    if path is not None and path.exists():
        cached = _from_cache(path, names, method, algorithm, list(channel_max_for))
        if cached is not None:
            return cached

    per_channel = set(channel_max_for)
    observers = {name: make_observer(method, percentile, channels=name in per_channel) for name in names}
    batches = iter_batches(calibration_data, input_specs, max_batches)
    bar = Progress(expected_batches(calibration_data, max_batches), enabled=progress)
    peaks = dict.fromkeys(peaks_for, 0.0)
    count = collect(onnx_model, observers, batches, bar, peaks=peaks)
    checks = {name: observer.check() for name, observer in observers.items()}
    amax = {name: check.amax for name, check in checks.items()}
    zero = [n for n, a in amax.items() if a == 0.0]
    if zero:
        logger.warning(
            "calibration: %d tensor(s) were exactly zero on every batch (amax 0): %s",
            len(zero), ", ".join(zero[:5]) + (" ..." if len(zero) > 5 else ""),
        )
    channel_max = {n: o.channel_max for n, o in observers.items() if o.channel_max is not None}
    extents = {n: o.extent for n, o in observers.items() if o.extent is not None}
    result = CalibrationResult(
        amax, method, count, checks=checks, channel_max=channel_max, extents=extents, peaks=peaks
    )
    logger.info("calibration: %s ranges for %d tensors from %d batches", method, len(names), count)
    if path is not None:
        write_cache(path, result.scales(), algorithm)
        if channel_max:
            write_channel_max(path, channel_max)
    return result


def check_ranges(
    onnx_model: onnx.ModelProto,
    amax: dict[str, float],
    data: CalibrationData,
    *,
    input_specs: Sequence[TensorSpec],
    method: str = "cache",
) -> dict[str, RangeCheck]:
    """What given ranges (from a calibration cache, say) clip and cost on ``data``.

    One streaming pass, as ``calibrate``'s, that measures instead of choosing: it
    explains a bad INT8 result when the ranges were not calibrated in this run.
    """
    observers = {name: HistogramObserver("minmax") for name in amax}
    collect(onnx_model, observers, iter_batches(data, input_specs, None), Progress(None, enabled=False))
    return {name: observer.check_range(amax[name], method) for name, observer in observers.items()}
