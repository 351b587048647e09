"""``PrecisionReport``: what the precision pipeline did, as ``CompiledModule.precision_report`` shows it.

Module files hold it as JSON (``spec.info["precision"]``); ``to_json`` writes the
keys each pass has always written, in the same order, and ``from_json`` reads any
file (keys it does not know stay in ``extra`` and are written back as they were).
A field is None where its pass did not run: at FP32 every field is, and the JSON is ``{}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .budget import BudgetReport
from .readout import AccuracyReadout

if TYPE_CHECKING:
    from ..config import Int8Layout


@dataclass
class PrecisionReport:
    """The precision pass's report; the fields follow the JSON keys (docs/precision.md)."""

    precision: str | None = None  # "fp16", "int8", "fp8", "int4", "nvfp4"; None at FP32 (no pass ran)
    from_graph: bool | None = None  # True: the graph already carried its precision, nothing was applied
    # Calibration (INT8 and FP8)
    calibrator: str | None = None
    calibration_seconds: float | None = None
    calibration_batches: int | None = None
    calibration_from_cache: bool | None = None
    float_precision: str | None = None  # the precision of what is not quantized
    int8_layout: Int8Layout | None = None  # INT8: "tensorrt" (symmetric, what TensorRT builds) or "cpu"
    overflow_checked: bool | None = None  # the FP16 part was run on calibration data for Inf/NaN
    percentile: float | None = None  # the percentile calibrator's setting
    # Q/DQ (Int8Report.to_json)
    qdq_nodes: int | None = None
    q_nodes: int | None = None
    dq_nodes: int | None = None
    quantized_activations: int | None = None
    quantized_weights: int | None = None
    quantized_units: list[dict[str, str]] | None = None  # {"node", "op", "module"}
    not_quantized: list[dict[str, Any]] | None = None  # {"node", "op", "reason", "module"}
    floored_scales: list[str] | None = None
    weight_only: dict[str, Any] | None = None  # INT4/NVFP4: format, block, method, weight bytes (int4.WeightOnlyReport)
    # FP16 (Fp16Report.to_json)
    fp16_nodes: int | None = None
    casts_added: int | None = None
    kept_fp32: list[dict[str, Any]] | None = None  # {"node", "op", "reason", "module"}
    fp16_safe_masks: list[dict[str, Any]] | None = None  # MaskRewrite.to_json
    # Ranges, kept so that export_onnx can write TensorRT's calibration cache next to an INT8 graph.
    activation_amax: dict[str, float] | None = None
    smoothquant: dict[str, Any] | None = None  # {"alpha", "tensors": [SmoothedTensor.to_json]}
    range_checks: dict[str, dict[str, Any]] | None = None  # tensor -> RangeCheck.to_json + "module"
    accuracy_budget: BudgetReport | None = None
    accuracy: AccuracyReadout | None = None  # the module against FP32 on held-back data
    extra: dict[str, Any] = field(default_factory=dict)  # keys of another trtopt version, kept as read

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            data[f.name] = value.to_json() if hasattr(value, "to_json") else value
        if self.calibrator is None and "overflow_checked" in data:
            # An FP16 report has always written overflow_checked after qdq_nodes: keep files byte-identical.
            data = _move_after(data, "overflow_checked", "qdq_nodes")
        data.update(self.extra)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrecisionReport:
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        for name, kind in (("accuracy_budget", BudgetReport), ("accuracy", AccuracyReadout)):
            if name in values:
                typed = _typed(kind, values[name])
                if typed is None:  # written by a version with another layout: keep it as it is
                    extra[name] = values.pop(name)
                else:
                    values[name] = typed
        return cls(**values, extra=extra)


def _typed(kind: type, value: Any) -> Any:
    """``kind(**value)`` keeping the fields ``kind`` has; None when ``value`` does not fit it."""
    if not isinstance(value, dict):
        return None
    names = {f.name for f in dataclasses.fields(kind)}
    try:
        return kind(**{k: v for k, v in value.items() if k in names})
    except TypeError:
        return None


def _move_after(data: dict[str, Any], key: str, anchor: str) -> dict[str, Any]:
    if anchor not in data:
        return data
    value = data.pop(key)
    moved: dict[str, Any] = {}
    for name, item in data.items():
        moved[name] = item
        if name == anchor:
            moved[key] = value
    return moved
