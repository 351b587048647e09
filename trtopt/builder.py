"""The TensorRT build's public face: ONNX -> serialized, strongly typed TensorRT engine.

``build_engine`` builds an engine with one optimization profile per shape
profile (or takes it from the engine cache); ``engine_record`` and
``saved_engine_problem`` say where a saved engine may run; the ``require_*``
checks refuse FP8 and 4-bit weights on a GPU or TensorRT that cannot run them.
The implementation is ``trtopt.backends.tensorrt.build``; docs/gpu.md.
"""

from .backends.tensorrt.build import (
    build_engine,
    engine_record,
    require_fp8_support,
    require_weight_only_support,
    saved_engine_problem,
)

__all__ = [
    "build_engine",
    "engine_record",
    "require_fp8_support",
    "require_weight_only_support",
    "saved_engine_problem",
]
