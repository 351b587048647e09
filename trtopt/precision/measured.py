"""``to_fp16`` and ``to_int8``: the graph passes (``fp16.py``, ``int8.py``) with the measuring around them.

They run the calibration data through the graph under ONNX Runtime to find the
ranges, and again after conversion to make sure it produces no Inf/NaN, keeping
the offending nodes in FP32 until it does not (docs/precision.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from ..errors import CalibrationError, GraphError
from ..names import added_by
from .fp16 import DEFAULT_FP16_THRESHOLD, Fp16Report, convert_to_fp16
from .masks import MaskReport, make_masks_fp16_safe
from .int8 import FP16_SCALE_FLOOR, FP32_SCALE_FLOOR, Int8Plan, Int8Report, quantize_int8
from .probe import nonfinite_tensors, tensor_ranges
from .validate import validate_qdq

logger = logging.getLogger(__name__)

Batches = Callable[[], Iterator[Mapping[str, np.ndarray]]]
NONFINITE_REASON = "produced Inf/NaN in FP16 on the calibration data"


def _nonfinite_culprits(model: onnx.ModelProto, bad: set[str]) -> set[str]:
    """Nodes where Inf/NaN first appears: a bad output from inputs that were all finite.

    When that node is a Cast the pass inserted (an FP32 value too big for FP16),
    its consumers are the ones to keep in FP32.
    """
    inserted = {node.name for node in model.graph.node if node.op_type == "Cast" and added_by(node) == "fp16"}
    graph = gs.import_onnx(model)
    culprits = set()
    for node in graph.nodes:
        if not any(t.name in bad for t in node.outputs) or any(t.name in bad for t in node.inputs):
            continue
        if node.name in inserted:
            culprits |= {c.name for out in node.outputs for c in out.outputs}
        else:
            culprits.add(node.name)
    return culprits


def to_fp16(
    model: onnx.ModelProto,
    batches: Batches | None,
    *,
    ranges: Mapping[str, float] | None = None,
    threshold: float = DEFAULT_FP16_THRESHOLD,
    exclude_nodes: Iterable[str] = (),
    exclude_op_types: Iterable[str] = (),
    max_repairs: int = 8,
    masks: MaskReport | None = None,
) -> tuple[onnx.ModelProto, Fp16Report]:
    """FP16-convert ``model`` and make sure the calibration data gives no Inf/NaN.

    First the attention masks built from ``finfo(float32).min`` or ``-inf`` are
    made FP16-safe (``make_masks_fp16_safe``), unless ``masks`` says that was
    done already (then ``ranges`` must have been measured after it).
    ``ranges`` (max |x| per tensor) are measured on ``model`` when not given.
    After each conversion the data is run again; nodes where Inf/NaN first
    appears join the FP32 keep-list, up to ``max_repairs`` rounds. Without
    ``batches`` only weights, exclusions and op support decide, and nothing is checked.
    """
    if masks is None:
        rewritten, masks = make_masks_fp16_safe(model)
        if masks.rewrites and ranges is not None:
            raise GraphError(
                "to_fp16 got ranges measured before the attention-mask rewrite changed the graph; run "
                "make_masks_fp16_safe first, measure the ranges on its result, and pass its report as masks="
            )
        model = rewritten
    if batches is None:
        return convert_to_fp16(
            model, ranges, threshold=threshold, exclude_nodes=exclude_nodes, exclude_op_types=exclude_op_types,
            masks=masks,
        )
    if ranges is None:
        ranges = tensor_ranges(model, batches())
    broken = sorted(n for n, v in ranges.items() if not math.isfinite(v))
    if broken:
        raise CalibrationError(
            f"the FP32 model already produces Inf/NaN on the calibration data at {broken[:3]}; "
            "check the calibration data (FP16 conversion needs finite FP32 activations)"
        )
    keep: dict[str, str] = {}
    for _ in range(max_repairs + 1):
        converted, report = convert_to_fp16(
            model,
            ranges,
            threshold=threshold,
            exclude_nodes=exclude_nodes,
            exclude_op_types=exclude_op_types,
            keep=keep,
            masks=masks,
        )
        bad = nonfinite_tensors(converted, batches())  # FP16 as TensorRT computes it (the executor emulates it)
        if not bad:
            return converted, report
        kept = {k.name for k in report.kept}
        new = {n for n in _nonfinite_culprits(converted, bad) if n not in kept}
        if not new:
            break
        logger.warning("fp16: Inf/NaN on the calibration data at %s; keeping %s in FP32", sorted(bad)[:3], sorted(new))
        keep.update(dict.fromkeys(new, NONFINITE_REASON))
    raise GraphError(
        f"the FP16 graph still produces Inf/NaN on the calibration data at {sorted(bad)[:5]}; "
        "exclude those nodes (exclude_nodes / exclude_op_types) or lower fp16_threshold"
    )


def float_part_ranges(model: onnx.ModelProto, batches: Batches) -> dict[str, float]:
    """What ``to_int8`` measures for an FP16 float part: max |x| of each tensor of ``model`` with its
    attention masks made FP16-safe first (a finfo.min or -inf mask would read as an overflow)."""
    return tensor_ranges(make_masks_fp16_safe(model)[0], batches())


def to_int8(
    model: onnx.ModelProto,
    plan: Int8Plan,
    amax: Mapping[str, float],
    batches: Batches | None,
    *,
    float_precision: str = "fp16",
    threshold: float = DEFAULT_FP16_THRESHOLD,
    exclude_nodes: Iterable[str] = (),
    exclude_op_types: Iterable[str] = (),
    layout: str = "tensorrt",
    extents: Mapping[str, tuple[float, float]] | None = None,
    ranges: Mapping[str, float] | None = None,
) -> tuple[onnx.ModelProto, Int8Report, Fp16Report | None]:
    """Insert ``plan``'s Q/DQ pairs (INT8 or FP8, as planned) with scales from ``amax``; the rest
    in ``float_precision``.

    With ``float_precision="fp16"`` the float part goes through ``to_fp16`` (keep-list,
    Inf/NaN check; skipped without ``batches``), and the Q/DQ scales become FP16 (opset 19).
    ``layout="cpu"`` writes the CPU layout (``quantize_int8``; ``extents``: observed
    (min, max) per tensor), which TensorRT's rules (``validate_qdq``) do not apply to.
    ``ranges``: ``float_part_ranges(model, batches)``, when the caller has them already.
    """
    if float_precision not in ("fp16", "fp32"):
        raise GraphError(f"float_precision={float_precision!r}; use 'fp16' or 'fp32'")
    half = float_precision == "fp16"
    masks = None
    if half:
        if ranges is None and batches is not None:
            ranges = float_part_ranges(model, batches)
        model, masks = make_masks_fp16_safe(model)
    else:
        ranges = None
    # onnx-graphsurgeon warns on every FP8 tensor that numpy has no such type (it keeps them exact).
    with G_LOGGER.suppress(G_LOGGER.ERROR):
        quantized, int8_report = quantize_int8(
            model, plan, amax, ranges=ranges, scale_floor=FP16_SCALE_FLOOR if half else FP32_SCALE_FLOOR,
            layout=layout, signed_ranges=extents,
        )
        fp16_report = None
        if half:
            quantized, fp16_report = to_fp16(
                quantized,
                batches,
                ranges={**(ranges or {}), **int8_report.dq_peaks},
                threshold=threshold,
                exclude_nodes=exclude_nodes,
                exclude_op_types=exclude_op_types,
                masks=masks,
            )
    if layout == "tensorrt":
        validate_qdq(quantized)
    return quantized, int8_report, fp16_report
