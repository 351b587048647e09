"""SmoothQuant: move activation outliers into the weights before INT8 (Xiao et al., 2023).

Transformer activations carry a few outlier channels (BERT's LayerNorm outputs
reach 10-20 where most channels stay near 1), so one per-tensor INT8 scale
leaves the ordinary channels with a handful of levels. For a unit ``Y = X W``
(MatMul ``W`` [K, N], or Gemm) SmoothQuant rescales each input channel ``j``:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),   X' = X / s,   W' = diag(s) W

so ``X' W' = X W`` exactly in real arithmetic, the activation's channels are
flattened, and the weight (quantized per output channel) absorbs the spread.
``alpha`` trades one for the other; 0.5 is the paper's and NVIDIA ModelOpt's
default for INT8 transformers.

Where ``1/s`` goes:
- folded into the LayerNormalization that produces ``X`` (its scale and bias),
  when every consumer of ``X`` is a unit smoothed with the same ``s``
  (pre-LayerNorm blocks: GPT, ViT);
- otherwise a per-channel ``Mul`` by ``1/s`` inserted in front of the units
  (post-LayerNorm BERT, whose LayerNorm output also feeds the residual; the
  GELU output in front of a feed-forward layer). TensorRT fuses that Mul into
  the pointwise producer and the quantize.

Units that read the same activation (query, key and value) share one ``s``,
taken over all their weights. ``max|X_j|`` comes from the same streaming
calibration pass that measures every range (``calibrate(channel_max_for=...)``).
``smooth`` returns each smoothed activation's max, ``max_j(max|X_j| / s_j)``,
exact from those statistics; the pipeline then calibrates the smoothed tensors
with the chosen calibrator in a second pass over them alone (keeping that max
only when the ranges came from a calibration cache, which has no data).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import check_model, read_weight, store_weight
from ..names import inherit_metadata
from .int8 import Int8Plan

logger = logging.getLogger(__name__)

SCALE_LIMIT = 1e4  # s is clipped to [1/SCALE_LIMIT, SCALE_LIMIT]: a dead channel must not blow up a weight row


@dataclass(frozen=True)
class SmoothUnit:
    """A unit SmoothQuant may rescale: its node, its weight initializer and the weight's input-channel axis."""

    node: str
    weight: str
    channel_axis: int


@dataclass(frozen=True)
class SmoothedTensor:
    """One smoothed activation: where 1/s went, the spread of s, and the smoothed range."""

    tensor: str
    units: tuple[str, ...]
    folded_into: str | None  # the LayerNormalization that absorbed 1/s, or None for an inserted Mul
    scale_min: float
    scale_max: float
    amax_before: float
    amax_after: float

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "units": list(self.units)}


def smoothable_groups(model: onnx.ModelProto, plan: Int8Plan) -> dict[str, list[SmoothUnit]]:
    """The planned MatMul/Gemm units whose weight may be rescaled, grouped by their activation input.

    A weight shared with another node (tied embeddings) is left alone: rescaling it
    would change that node too.
    """
    nodes = {node.name: node for node in model.graph.node}
    initializers = {t.name for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    groups: dict[str, list[SmoothUnit]] = {}
    for name, index, axis in plan.weights:
        node = nodes[name]
        transposed_a = any(a.name == "transA" and a.i for a in node.attribute)
        if node.op_type not in ("MatMul", "Gemm") or transposed_a:
            continue
        weight = node.input[index]
        if weight not in initializers or uses.get(weight, 0) != 1:
            continue
        groups.setdefault(node.input[0], []).append(SmoothUnit(name, weight, 1 - axis))
    return groups


def smooth(
    model: onnx.ModelProto,
    groups: Mapping[str, list[SmoothUnit]],
    channel_max: Mapping[str, np.ndarray],
    alpha: float,
) -> tuple[onnx.ModelProto, dict[str, float], list[SmoothedTensor]]:
    """Apply SmoothQuant to ``groups``; returns (graph, INT8 range of each smoothed tensor, report).

    The returned graph computes the same function as ``model`` (up to float rounding);
    the smoothed activations are new tensors (``<name>__smoothed``) unless folded into
    a LayerNormalization, which keeps the name. Weights on disk are read and rewritten one
    group at a time (``trtopt.graph.read_weight`` / ``store_weight``).
    """
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    graph = smoothed.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    ranges: dict[str, float] = {}
    report: list[SmoothedTensor] = []
    muls: list[onnx.NodeProto] = []
    for tensor, units in groups.items():
        x_max = np.asarray(channel_max.get(tensor, ()), dtype=np.float64)
        weights = [read_weight(model, initializers[u.weight]).astype(np.float64) for u in units]
        if x_max.ndim != 1 or any(w.shape[u.channel_axis] != x_max.size for w, u in zip(weights, units)):
            logger.info("smoothquant: %s skipped (no per-channel statistics matching its weights)", tensor)
            continue
        w_max = np.max([np.abs(w).max(axis=1 - u.channel_axis) for w, u in zip(weights, units)], axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where((x_max > 0) & (w_max > 0), x_max**alpha / w_max ** (1 - alpha), 1.0)
        scale = np.clip(scale, 1 / SCALE_LIMIT, SCALE_LIMIT)
        for w, u in zip(weights, units):
            shape = [1, 1]
            shape[u.channel_axis] = -1
            initializers[u.weight].CopyFrom(store_weight(smoothed, (w * scale.reshape(shape)).astype(np.float32), u.weight))
        unit_names = {u.node for u in units}
        readers = consumers.get(tensor, [])
        norm = _foldable_norm(producers.get(tensor), readers, unit_names, consumers, initializers, tensor in outputs)
        if norm is not None:
            for name in norm.input[1:3]:
                values = read_weight(model, initializers[name]).astype(np.float64)
                initializers[name].CopyFrom(store_weight(smoothed, (values / scale).astype(np.float32), name))
            target = tensor
        else:
            muls.append(_smoothing_mul(tensor, scale, graph, [n for n in readers if n.name in unit_names]))
            target = muls[-1].output[0]
        ranges[target] = float(np.max(x_max / scale))
        report.append(
            SmoothedTensor(
                target, tuple(u.node for u in units), norm.name if norm is not None else None,
                float(scale.min()), float(scale.max()), float(x_max.max()), ranges[target],
            )
        )
    _insert_before_first_reader(graph, muls)
    smoothed = check_model(smoothed)  # shapes and types for the new tensors
    logger.info(
        "smoothquant (alpha %.2f): %d activation(s) of %d unit(s) smoothed, %d folded into a LayerNormalization",
        alpha, len(report), sum(len(r.units) for r in report), sum(r.folded_into is not None for r in report),
    )
    return smoothed, ranges, report


def _foldable_norm(
    producer: onnx.NodeProto | None,
    readers: list[onnx.NodeProto],
    units: set[str],
    consumers: Mapping[str, list[onnx.NodeProto]],
    initializers: Mapping[str, onnx.TensorProto],
    is_output: bool,
) -> onnx.NodeProto | None:
    """The LayerNormalization that may absorb 1/s: it feeds only these units and owns its scale and bias."""
    if producer is None or producer.op_type != "LayerNormalization" or is_output or len(producer.input) < 3:
        return None
    if {n.name for n in readers} != units or len(producer.output) != 1:
        return None
    params = producer.input[1:3]
    if not all(p in initializers and len(consumers.get(p, [])) == 1 for p in params) or params[0] == params[1]:
        return None  # a scale or bias another node reads too cannot change for this one alone
    return producer


def _smoothing_mul(tensor: str, scale: np.ndarray, graph: onnx.GraphProto, units: list[onnx.NodeProto]) -> onnx.NodeProto:
    """A Mul computing ``tensor * (1/scale)`` as a new tensor, which ``units`` now read instead."""
    inverse = f"{tensor}__smooth_inverse_scale"
    graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
    mul = onnx.helper.make_node("Mul", [tensor, inverse], [f"{tensor}__smoothed"], name=f"{units[0].name}/SmoothQuant_Mul")
    inherit_metadata(mul, units[0], "smoothquant")  # the module path of the layer it serves
    for unit in units:
        unit.input[0] = mul.output[0]
    return mul


def _insert_before_first_reader(graph: onnx.GraphProto, muls: list[onnx.NodeProto]) -> None:
    """Put each Mul just before the first node that reads its output (the graph stays sorted)."""
    pending = {mul.output[0]: mul for mul in muls}
    nodes = []
    for node in graph.node:
        nodes += [pending.pop(name) for name in node.input if name in pending]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
