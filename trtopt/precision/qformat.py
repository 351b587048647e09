"""Quantization formats: what INT8 and FP8 (E4M3) Q/DQ differ in, and nothing else.

TensorRT's explicit quantization is the same scheme for both (symmetric, zero
point 0, a per-tensor activation scale, per-channel weight scales): only the
code type and its largest value change. From TensorRT's "Quantization Schemes"
(https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-schemes.html):

- INT8: ``q = roundWithTiesToEven(clip(x / s, -128, 127))``, ``s = amax / 127``;
- FP8:  ``q = castToFp8(clip(x / s, -448, 448))`` (round to nearest, ties to
  even), ``s = amax / 448``: 448 is FLOAT8E4M3FN's largest finite value, and the
  clip makes the conversion saturating (ONNX's ``saturate=1``, its default).

The placement pass (``int8.plan_int8``), the Q/DQ insertion
(``int8.quantize_int8``), the validator, the accuracy budget and the readout
take one of these objects instead of hard-coding 127 and ``int8``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx

from ..errors import ConfigError

FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN value


@dataclass(frozen=True)
class QuantFormat:
    """One Q/DQ code type: its name (also the ``precision`` value), qmax and ONNX/numpy dtypes."""

    name: str
    qmax: float  # scale = amax / qmax
    onnx_type: int  # TensorProto data type of the codes and the zero point
    dtype: np.dtype  # numpy dtype of the codes (ml_dtypes for FP8)
    weight_qmax: float  # largest code a weight gets: INT8 weights stay symmetric in [-127, 127]

    def zero(self, shape: tuple[int, ...] = ()) -> np.ndarray:
        """A zero point of this format (TensorRT supports only zero)."""
        return np.zeros(shape, self.dtype)

    def encode(self, scaled: np.ndarray) -> np.ndarray:
        """Codes for ``values / scale``: clipped to the format's range, rounded half to even.

        INT8 rounds with ``np.rint``; FP8 clips first (ml_dtypes' cast would turn values
        beyond 448 into NaN, TensorRT saturates) and ml_dtypes rounds to nearest even.
        """
        clipped = np.clip(scaled, -self.weight_qmax, self.weight_qmax)
        if self.name == "int8":
            clipped = np.rint(clipped)
        return clipped.astype(self.dtype)


INT8 = QuantFormat("int8", 127.0, onnx.TensorProto.INT8, np.dtype(np.int8), 127.0)
FP8 = QuantFormat("fp8", FP8_MAX, onnx.TensorProto.FLOAT8E4M3FN, np.dtype(ml_dtypes.float8_e4m3fn), FP8_MAX)
FORMATS = {f.name: f for f in (INT8, FP8)}


def quant_format(value: str | QuantFormat) -> QuantFormat:
    """The format named ``value`` (``"int8"`` or ``"fp8"``); a QuantFormat is returned as is."""
    if isinstance(value, QuantFormat):
        return value
    name = getattr(value, "value", value)  # a Precision enum member works too
    try:
        return FORMATS[str(name)]
    except KeyError:
        raise ConfigError(f"quantization format {value!r} is not one of {', '.join(map(repr, FORMATS))}") from None


def format_of(dtype: Any) -> QuantFormat | None:
    """The format whose codes have ``dtype`` (a numpy dtype, an ml_dtypes type, or an ONNX
    TensorProto type number, which onnx-graphsurgeon gives for types numpy lacks), else None."""
    for fmt in FORMATS.values():
        if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
            if int(dtype) == fmt.onnx_type:
                return fmt
            continue
        try:
            if np.dtype(dtype) == fmt.dtype:
                return fmt
        except TypeError:
            continue
    return None


def graph_format(model: onnx.ModelProto) -> QuantFormat | None:
    """FP8 when any initializer (a zero point, a weight) is FLOAT8E4M3FN, INT8 when the graph has
    other Q/DQ nodes, None without Q/DQ. (trtopt never mixes the two in one graph.)"""
    if any(t.data_type == FP8.onnx_type for t in model.graph.initializer):
        return FP8
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return INT8
    return None
