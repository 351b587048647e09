"""INT8 calibration: per-tensor activation ranges, streamed in constant memory.

The entry point the precision pass calls::

    from trtopt.calibrators import calibrate, CalibrationResult, read_cache, write_cache

    result = calibrate(
        onnx_model,                 # onnx.ModelProto (the cleaned FP32 graph)
        tensor_names,               # Sequence[str]: activations to measure (graph inputs or node outputs)
        calibration_data,           # see below
        *,
        input_specs,                # Sequence[trtopt.spec.TensorSpec] of the graph inputs
        method="auto",              # "auto" | "entropy" | "mse" | "minmax" | "percentile" (or CalibratorKind)
        percentile=99.99,           # for method="percentile"
        max_batches=None,           # None: every batch
        cache_path=None,            # str | Path: read if valid & matching, else calibrate and write
        progress=True,              # progress line with ETA on stderr for runs over 2 s
    ) -> CalibrationResult          # .amax {name: float}, .method, .num_batches, .from_cache,
                                    # .scales() -> {name: amax / 127}

    write_cache(path, scales, algorithm="EntropyCalibration2", version="100300") -> Path
        # scales = amax / 127 per tensor; algorithm from cache.algorithm_name(method, percentile)
    read_cache(path) -> CalibrationCache    # .version, .algorithm, .scales {name: amax / 127}, .amax()

* Methods (``observers``): ``entropy`` is TensorRT's EntropyCalibration2 search
  over a 2048-bin histogram of |x| (ties to the widest cut; discrete data keeps
  its full range), ``mse`` the least expected quantization error, ``minmax``
  max |x|, ``percentile`` the given percentile of |x|, all from the same
  histogram; ``auto`` (the default) the least-error of those four that clips at
  most 0.1% of the values. Each range comes with its check (``RangeCheck``).
* Histograms grow as TensorRT's do: the range doubles and bins merge pairwise
  (``histogram``); counts stay exact and memory constant.
* ``calibration_data`` (``data``): an iterable of batches (DataLoader, list,
  generator) whose batches are tensors/arrays, tuples mapped positionally onto
  the inputs (extra elements such as labels ignored) or dicts keyed by input
  name; a stacked array; or a ``.npz`` path. Bad data is a CalibrationError
  naming the batch and the input.
* Cache (``cache``): the TensorRT calibration-cache text format. A cache at
  ``cache_path`` is used when it was written by the same method and holds every
  tensor asked for (extra tensors are fine, TensorRT's caches list them all);
  otherwise a warning is logged, the data is calibrated again and the cache
  overwritten. A file that is not a calibration cache at all is a
  CalibrationError and is left alone. Ranges from a cache give
  ``num_batches == 0`` and ``from_cache == True``.
* A tensor that is zero on every batch gets amax 0.0 (a warning names it);
  the precision pass must not quantize it with scale 0.
"""

from .cache import CalibrationCache, read_cache, write_cache
from .calibration import CalibrationResult, calibrate, check_ranges
from .observers import RangeCheck

__all__ = ["calibrate", "check_ranges", "CalibrationResult", "RangeCheck", "CalibrationCache", "read_cache", "write_cache"]
