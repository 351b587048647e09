"""INT8 calibration: per-tensor activation ranges, streamed in constant memory.

``calibrate(onnx_model, tensor_names, calibration_data, *, input_specs, method="auto", ...)``
returns a ``CalibrationResult`` (``.amax`` per tensor, ``.scales()``, ``.from_cache``);
``check_ranges`` gives each range its ``RangeCheck``; ``read_cache``/``write_cache`` read and
write TensorRT's calibration-cache text format. Modules: ``data`` (user data -> batches),
``collect`` (activations streamed through the executor), ``histogram``, ``observers`` (the
methods), ``cache``, ``calibration`` (the entry point). docs/design.md section 5 and
docs/calibration.md give the methods, the accepted data forms and the cache rules.
"""

from .cache import CalibrationCache, read_cache, write_cache
from .calibration import CalibrationResult, calibrate, check_ranges
from .observers import RangeCheck

__all__ = ["calibrate", "check_ranges", "CalibrationResult", "RangeCheck", "CalibrationCache", "read_cache", "write_cache"]
