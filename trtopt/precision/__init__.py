"""Precision written into the graph: FP16 with an FP32 keep-list, INT8 or FP8 Q/DQ, and their checks.

TensorRT 11 takes precision only from the graph (strong typing), so these
passes are what ``precision="fp16"``, ``"int8"`` and ``"fp8"`` mean (INT8 and
FP8 share one Q/DQ pass; ``plan_int8(..., fmt="fp8")`` picks the format). The graph
passes (``convert_to_fp16``, ``plan_int8`` + ``quantize_int8``) are pure: model
and measured numbers in, model and report out. ``to_fp16`` and ``to_int8`` add
the measuring around them: they run the calibration data through the graph
under ONNX Runtime to find the ranges, and again after conversion to make sure
it produces no Inf/NaN, keeping the offending nodes in FP32 until it does not.
``apply_precision`` (``pipeline.py``) is what ``compile`` runs: the whole precision
step, from the data split to the ``PrecisionReport``.
"""

from ..calibrators.data import feed_batches
from ..executor.fp16_emulation import emulate_fp16
from .fp16 import DEFAULT_FP16_THRESHOLD, FP16_MAX, Fp16Report, KeptNode, convert_to_fp16
from .int8 import Int8Plan, Int8Report, plan_int8, quantize_int8
from .masks import MaskReport, MaskRewrite, make_masks_fp16_safe
from .measured import to_fp16, to_int8
from .pipeline import apply_precision, carried_precision
from .probe import tensor_ranges
from .qformat import FP8, INT8, QuantFormat, graph_format, quant_format
from .report import PrecisionReport
from .validate import validate_qdq

__all__ = [
    "DEFAULT_FP16_THRESHOLD",
    "FP16_MAX",
    "FP8",
    "INT8",
    "QuantFormat",
    "PrecisionReport",
    "apply_precision",
    "carried_precision",
    "Fp16Report",
    "Int8Plan",
    "Int8Report",
    "KeptNode",
    "MaskReport",
    "MaskRewrite",
    "convert_to_fp16",
    "emulate_fp16",
    "feed_batches",
    "make_masks_fp16_safe",
    "graph_format",
    "plan_int8",
    "quant_format",
    "quantize_int8",
    "tensor_ranges",
    "to_fp16",
    "to_int8",
    "validate_qdq",
]
