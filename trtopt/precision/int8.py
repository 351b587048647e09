"""INT8 and FP8 explicit quantization: QuantizeLinear/DequantizeLinear where TensorRT fuses them.

One pass serves both formats (``qformat``: INT8, or FP8 E4M3 for Ada/Hopper GPUs);
the plan carries its format, so what is planned is what gets quantized.

Placement (conservative: every extra Q/DQ pair can break a fusion):
- both inputs of Conv, ConvTranspose, Gemm and MatMul whose weight is a
  constant: the activation per-tensor with the calibrated amax, the weight
  per-channel along the output-channel axis;
- never the outputs of weighted ops, so TensorRT fuses Conv+bias+ReLU;
- the residual (skip) input of an Add that follows a Conv, so the Add fuses
  into the Conv's INT8 epilogue;
- the input of a pooling op whose output is quantized anyway, so the pool runs
  in INT8 between quantized regions.

Activation-by-activation MatMuls (attention) stay in float, as do norms and
Softmax. Weights are stored as INT8 initializers followed by a
DequantizeLinear (what TensorRT, ModelOpt and onnxruntime's QDQ format use).
Quantization is symmetric: zero point 0, ``scale = amax / 127`` (INT8) or
``amax / 448`` (FP8); ONNX's QuantizeLinear rounds half to even, and so do
``np.rint`` and ml_dtypes' FP8 cast for the weights.

FP8 differs in placement only where TensorRT's FP8 kernels do, following NVIDIA
ModelOpt's ONNX FP8 recipe (``modelopt/onnx/quantization/fp8.py``, which quantizes
Conv, Gemm, MatMul and the residual Add):

- a Conv is quantized only when TensorRT has an FP8 kernel for its shape: input
  and output channels at least 16 and alike modulo 16 (so both pad to the
  16-channel alignment FP8 convolutions need) and a filter of at most 32 taps
  (3x3 and 5x5 yes, 7x7 no; a depthwise Conv has one input channel per group);
- pooling inputs are not quantized: the FP8 recipe quantizes only weighted ops
  and residual Adds, so a pool runs in the float part.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..config import INT8_LAYOUTS
from ..errors import CalibrationError, ConfigError
from ..graph import check_model, constant_values, export_graph, import_graph, new_constant
from ..names import carry_metadata, mark_added, node_modules
from .fp16 import KeptNode, user_exclusion
from .qformat import FP8, INT8, QuantFormat, quant_format

logger = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
POOLING_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
# The smallest normal FP16 number: scales that will be FP16 are kept at or above it,
# since a subnormal scale loses precision and its reciprocal overflows FP16.
FP16_SCALE_FLOOR = 2.0**-14
FP32_SCALE_FLOOR = float(np.finfo(np.float32).tiny)
# int8_layout="cpu": the layout ONNX Runtime's CPU integer kernels run fastest, exact on every
# x86 CPU. Activations are uint8 with a zero point over the calibrated [low, high]; weights are
# int8 within +-63, because without VNNI the u8 x s8 kernels add pairs of products in int16 with
# saturation and 2 * 255 * 63 < 32767 (ONNX Runtime's "reduce_range"). TensorRT cannot build it.
CPU_ACTIVATION_QMAX = 255
CPU_WEIGHT_QMAX = 63.0
# TensorRT's FP8 convolutions (ModelOpt's FP8 recipe excludes every other Conv).
FP8_CONV_CHANNEL_ALIGNMENT = 16
FP8_CONV_MAX_FILTER = 32


def weight_axis(node: gs.Node) -> int | None:
    """The output-channel axis of ``node``'s weight (input 1), or None if it has no such weight."""
    if node.op == "Conv":
        return 0  # [K, C, R, S]
    if node.op == "ConvTranspose":
        # [C, K/group, R, S]: per-channel along axis 1 is only well defined for group 1.
        return 1 if int(node.attrs.get("group", 1)) == 1 else None
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1  # B is [N, K] or [K, N]
    if node.op == "MatMul":
        return 1  # [K, N]
    return None


def _activation_product(node: gs.Node) -> bool:
    """A MatMul of two computed tensors (attention's Q.K^T or P.V), not a layer with a weight."""
    return node.op == "MatMul" and len(node.inputs) == 2 and all(isinstance(t, gs.Variable) for t in node.inputs)


@dataclass
class Int8Plan:
    """Where Q/DQ pairs go: decided from the graph alone, before any calibration.

    ``activations`` maps a tensor to the (node name, input index) uses that read
    its quantized copy; ``activation_tensors`` are the names the calibrator must
    measure.
    """

    activations: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    weights: list[tuple[str, int, int]] = field(default_factory=list)  # (node, input, axis)
    skipped: list[KeptNode] = field(default_factory=list)
    fmt: QuantFormat = INT8  # the codes the Q/DQ pairs will carry

    @property
    def activation_tensors(self) -> list[str]:
        return list(self.activations)

    def _use(self, tensor: str, node: str, index: int) -> None:
        uses = self.activations.setdefault(tensor, [])
        if (node, index) not in uses:
            uses.append((node, index))


def fp8_conv_reason(node: gs.Node) -> str | None:
    """Why TensorRT has no FP8 kernel for Conv ``node`` (a reason to keep it out of FP8), else None."""
    if node.op != "Conv" or not isinstance(node.inputs[1], gs.Constant):
        return None
    shape = node.inputs[1].shape  # [K, C / group, *filter]
    out_channels, in_channels = int(shape[0]), int(shape[1])
    align = FP8_CONV_CHANNEL_ALIGNMENT
    if out_channels < align or in_channels < align or out_channels % align != in_channels % align:
        return (
            f"FP8 convolutions need {align}+ input and output channels (per group), alike modulo {align}; "
            f"this one has {in_channels} -> {out_channels}"
        )
    taps = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    if taps > FP8_CONV_MAX_FILTER:
        return f"FP8 convolutions take filters of at most {FP8_CONV_MAX_FILTER} taps; this one has {taps}"
    return None


def plan_int8(
    model: onnx.ModelProto,
    *,
    fmt: str | QuantFormat = INT8,
    exclude_nodes: Iterable[str] = (),
    exclude_op_types: Iterable[str] = (),
    keep_first_last: bool = False,
    quantize_residual: bool = True,
    quantize_pooling: bool | None = None,
    quantize_attention: bool = False,
    quantize_conv_outputs: bool = False,
) -> Int8Plan:
    """Decide the Q/DQ placement for ``model`` in format ``fmt`` ("int8" or "fp8"; see the module
    docstring). ``quantize_pooling`` defaults to True for INT8 and False for FP8.

    ``exclude_nodes`` globs match node names and torch module paths (a module
    excludes every node inside it). ``quantize_attention`` also quantizes both inputs
    of activation-by-activation MatMuls (attention's Q.K^T and P.V, per tensor), the
    placement TensorRT's INT8 multi-head-attention fusion looks for; off, they stay
    in the float precision. ``quantize_conv_outputs`` (the CPU layout) also quantizes
    a quantized Conv's output where a float op other than Relu reads it (a residual
    Add, HardSwish, HardSigmoid, ...), so the Conv runs on integer kernels from end
    to end (TensorRT fuses those ops into the Conv instead).
    """
    fmt = quant_format(fmt)
    if quantize_pooling is None:
        quantize_pooling = fmt is INT8
    modules = node_modules(model)
    graph = gs.import_onnx(model)
    graph.toposort()
    exclude_nodes, exclude_op_types = tuple(exclude_nodes), tuple(exclude_op_types)
    plan = Int8Plan(fmt=fmt)

    weighted = _quantizable_weighted_ops(graph, plan, modules, exclude_nodes, exclude_op_types, quantize_attention)
    if keep_first_last and weighted:
        ends = {id(weighted[0][0]): "first weighted layer", id(weighted[-1][0]): "last weighted layer"}
        plan.skipped += [
            KeptNode(n.name, n.op, ends[id(n)] + " kept in higher precision", modules.get(n.name))
            for n, _ in weighted if id(n) in ends
        ]
        weighted = [(n, a) for n, a in weighted if id(n) not in ends]

    quantized_convs = set()
    for node, axis in weighted:
        plan._use(node.inputs[0].name, node.name, 0)
        plan.weights.append((node.name, 1, axis))
        if node.op in ("Conv", "ConvTranspose"):
            quantized_convs.add(id(node))
    excluded = (exclude_nodes, exclude_op_types, modules)
    if quantize_residual:
        _plan_residual_adds(graph, plan, quantized_convs, excluded)
    if quantize_conv_outputs:
        _plan_conv_outputs(graph, plan, quantized_convs, excluded)
    if quantize_pooling:
        # Reverse order, so a chain of pools in front of a quantized op is covered.
        for node in reversed(graph.nodes):
            if node.op in POOLING_OPS and node.outputs[0].name in plan.activations:
                if user_exclusion(node, exclude_nodes, exclude_op_types, modules.get(node.name)) is None:
                    plan._use(node.inputs[0].name, node.name, 0)
    return plan


def _quantizable_weighted_ops(
    graph: gs.Graph,
    plan: Int8Plan,
    modules: Mapping[str, str],
    exclude_nodes: tuple[str, ...],
    exclude_op_types: tuple[str, ...],
    quantize_attention: bool,
) -> list[tuple[gs.Node, int]]:
    """(node, weight axis) of each weighted op to quantize, in graph order; the others go to
    ``plan.skipped`` with their reason (attention's products, with ``quantize_attention``, to the plan)."""
    weighted: list[tuple[gs.Node, int]] = []
    for node in graph.nodes:
        if node.op not in WEIGHTED_OPS:
            continue
        axis = weight_axis(node)
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        reason = user_exclusion(node, exclude_nodes, exclude_op_types, modules.get(node.name))
        if reason is None and quantize_attention and _activation_product(node):
            plan._use(node.inputs[0].name, node.name, 0)
            plan._use(node.inputs[1].name, node.name, 1)
            continue
        if axis is None:
            reason = reason or "grouped ConvTranspose: no single output-channel axis"
            plan.skipped.append(KeptNode(node.name, node.op, reason, modules.get(node.name)))
            continue
        if reason is None and not (
            isinstance(weight, gs.Constant) and (node.op in ("Conv", "ConvTranspose") or len(weight.shape) == 2)
        ):
            reason = "weight is not a 2-D constant (activation x activation products stay in float)"
        if reason is None and isinstance(node.inputs[0], gs.Constant):
            reason = "its data input is a constant"
        if reason is None and plan.fmt is FP8:
            reason = fp8_conv_reason(node)
        if reason is not None:
            plan.skipped.append(KeptNode(node.name, node.op, reason, modules.get(node.name)))
            continue
        weighted.append((node, axis))
    return weighted


def _plan_residual_adds(graph: gs.Graph, plan: Int8Plan, quantized_convs: set[int], excluded: tuple[Any, ...]) -> None:
    """The skip input of each Add that follows a quantized Conv."""
    exclude_nodes, exclude_op_types, modules = excluded
    for node in graph.nodes:
        if node.op != "Add" or user_exclusion(node, exclude_nodes, exclude_op_types, modules.get(node.name)):
            continue
        if not all(isinstance(t, gs.Variable) for t in node.inputs):
            continue  # an Add with a constant is a bias, not a skip connection
        from_conv = [bool(t.inputs) and id(t.inputs[0]) in quantized_convs for t in node.inputs]
        if any(from_conv):
            # The first Conv-fed input fuses into that Conv; the other one is the residual.
            skip = 1 if from_conv[0] else 0
            plan._use(node.inputs[skip].name, node.name, skip)


def _plan_conv_outputs(graph: gs.Graph, plan: Int8Plan, quantized_convs: set[int], excluded: tuple[Any, ...]) -> None:
    """A quantized Conv's output where an op other than Relu reads it (the CPU layout).

    ONNX Runtime's integer Conv writes quantized codes; a Conv whose output goes on
    in float runs as a float Conv. A Relu is left out: the CPU lowering drops a
    Relu in front of a uint8 QuantizeLinear with zero point 0, which clips at 0 itself.
    """
    exclude_nodes, exclude_op_types, modules = excluded
    for node in graph.nodes:
        if id(node) not in quantized_convs:
            continue
        for user in node.outputs[0].outputs:
            if user.op == "Relu" or user_exclusion(user, exclude_nodes, exclude_op_types, modules.get(user.name)):
                continue
            for index, tensor in enumerate(user.inputs):
                if tensor is node.outputs[0]:
                    plan._use(tensor.name, user.name, index)


@dataclass
class Int8Report:
    """What the INT8 pass inserted, and what it left in float and why."""

    quantized_activations: int = 0
    quantized_weights: int = 0
    q_nodes: int = 0
    dq_nodes: int = 0
    skipped: list[KeptNode] = field(default_factory=list)
    # The weighted ops quantized: {"node", "op", "module"} (module: the torch module path, when known).
    units: list[dict[str, str]] = field(default_factory=list)
    floored_scales: list[str] = field(default_factory=list)
    # DQ output -> the largest |value| it carries (the FP16 keep-list needs this).
    dq_peaks: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "qdq_nodes": self.q_nodes + self.dq_nodes,
            "q_nodes": self.q_nodes,
            "dq_nodes": self.dq_nodes,
            "quantized_activations": self.quantized_activations,
            "quantized_weights": self.quantized_weights,
            "quantized_units": self.units,
            "not_quantized": [k.to_json() for k in self.skipped],
            "floored_scales": self.floored_scales,
        }


def quantize_int8(
    model: onnx.ModelProto,
    plan: Int8Plan,
    amax: Mapping[str, float],
    *,
    ranges: Mapping[str, float] | None = None,
    scale_floor: float = FP16_SCALE_FLOOR,
    layout: str = "tensorrt",
    signed_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[onnx.ModelProto, Int8Report]:
    """Insert the Q/DQ pairs of ``plan`` into a float32 ``model``, in the plan's format.

    ``amax`` (tensor -> calibrated amax) gives the activation scales (amax / qmax);
    ``ranges`` (tensor -> max |x|, optional) only feeds ``dq_peaks``. Scales are
    float32 here; converting the rest of the graph to FP16 afterwards turns them
    into FP16 scales, so pass ``scale_floor=FP16_SCALE_FLOOR`` in that case.
    ``layout="cpu"`` (INT8 only) writes the CPU layout (see ``CPU_WEIGHT_QMAX``):
    each activation's range is its calibrated [-amax, amax] narrowed to the
    observed ``signed_ranges`` (tensor -> (min, max)) where given.
    """
    if layout not in INT8_LAYOUTS:
        raise ConfigError(f"int8_layout {layout!r} is not one of {', '.join(map(repr, INT8_LAYOUTS))}")
    if layout == "cpu" and plan.fmt is not INT8:
        raise ConfigError(f"int8_layout='cpu' is for INT8; {plan.fmt.name} graphs are for TensorRT only")
    _check_amax(plan, amax)
    graph = import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    report = Int8Report(skipped=list(plan.skipped))
    # Each node added -> the node it serves (its first use): named after it, and takes its module path.
    served: dict[str, str] = {}
    tensors = graph.tensors()
    for name, uses in plan.activations.items():
        value = float(amax[name])
        if layout == "cpu":
            params = _cpu_activation_params(value, (signed_ranges or {}).get(name), scale_floor)
        else:
            params = (value / plan.fmt.qmax, plan.fmt.zero())
        dq = _insert_activation_qdq(graph, nodes, tensors[name], uses, params, scale_floor, report, served)
        report.dq_peaks[dq.name] = float((ranges or {}).get(name, value))
    weight_fmt = replace(plan.fmt, weight_qmax=CPU_WEIGHT_QMAX) if layout == "cpu" else plan.fmt
    _insert_weight_dqs(model, graph, nodes, plan, weight_fmt, scale_floor, report, served)

    graph.cleanup().toposort()
    out = carry_metadata(model, check_model(export_graph(graph, model)), served)
    mark_added(out, served, "int8")
    logger.info(
        "%s: %d activations and %d weights quantized (%d Q, %d DQ); %d weighted ops left in float",
        plan.fmt.name,
        report.quantized_activations,
        report.quantized_weights,
        report.q_nodes,
        report.dq_nodes,
        sum(1 for k in report.skipped if k.op in WEIGHTED_OPS),
    )
    return out, report


def _check_amax(plan: Int8Plan, amax: Mapping[str, float]) -> None:
    missing = [t for t in plan.activation_tensors if t not in amax]
    if missing:
        raise CalibrationError(
            f"no calibrated amax for {len(missing)} tensor(s) to quantize, e.g. {missing[:3]}; "
            "calibrate these tensors (the calibration cache may be for another model)"
        )
    bad = [t for t in plan.activation_tensors if not np.isfinite(amax[t]) or amax[t] < 0]
    if bad:
        raise CalibrationError(
            f"calibrated amax of {bad[0]!r} is {amax[bad[0]]}; the calibration data gives "
            "non-finite activations there: check the data"
        )


def _insert_activation_qdq(
    graph: gs.Graph,
    nodes: Mapping[str, gs.Node],
    tensor: gs.Variable,
    uses: list[tuple[str, int]],
    params: tuple[float, np.ndarray],
    scale_floor: float,
    report: Int8Report,
    served: dict[str, str],
) -> gs.Variable:
    """One per-tensor Q/DQ pair on activation ``tensor`` with ``params`` (scale, zero point),
    read by all its ``uses``; returns the dequantized tensor."""
    name = tensor.name
    scale, zero = params
    if scale < scale_floor:
        report.floored_scales.append(name)
        scale = scale_floor
    q = gs.Variable(f"{name}__q", zero.dtype, tensor.shape)
    dq = gs.Variable(f"{name}__dq", np.float32, tensor.shape)
    scale_c = gs.Constant(f"{name}__scale", np.array(scale, np.float32))
    zp = gs.Constant(f"{name}__zero_point", zero)
    user, index = uses[0]
    q_name, dq_name = f"{user}/QuantizeLinear_in{index}", f"{user}/DequantizeLinear_in{index}"
    graph.nodes.append(gs.Node("QuantizeLinear", q_name, inputs=[tensor, scale_c, zp], outputs=[q]))
    graph.nodes.append(gs.Node("DequantizeLinear", dq_name, inputs=[q, scale_c, zp], outputs=[dq]))
    served.update({q_name: user, dq_name: user})
    for node_name, index in uses:
        nodes[node_name].inputs[index] = dq
    report.quantized_activations += 1
    report.q_nodes += 1
    report.dq_nodes += 1
    return dq


def _insert_weight_dqs(
    model: onnx.ModelProto,
    graph: gs.Graph,
    nodes: Mapping[str, gs.Node],
    plan: Int8Plan,
    fmt: QuantFormat,
    scale_floor: float,
    report: Int8Report,
    served: dict[str, str],
) -> None:
    """The per-channel weight of each planned unit of ``model`` (``graph`` imported from it); a weight
    two units share is quantized once."""
    modules = node_modules(model)
    shared: dict[tuple[str, int], gs.Variable] = {}
    for node_name, index, axis in plan.weights:
        node = nodes[node_name]
        unit = {"node": node_name, "op": node.op}
        report.units.append({**unit, "module": modules[node_name]} if node_name in modules else unit)
        weight = node.inputs[index]
        key = (weight.name, axis)
        if key not in shared:
            shared[key] = _quantized_weight(
                model, graph, weight, axis, scale_floor, report, f"{node_name}/DequantizeLinear_in{index}", fmt
            )
            served[shared[key].inputs[0].name] = node_name
            report.quantized_weights += 1
            report.dq_nodes += 1
        node.inputs[index] = shared[key]


def _cpu_activation_params(
    amax: float, observed: tuple[float, float] | None, scale_floor: float
) -> tuple[float, np.ndarray]:
    """(scale, uint8 zero point) over [-amax, amax] narrowed to the observed (min, max).

    The range always holds 0, so zero (padding, a ReLU's floor) is exact; a
    non-negative tensor gets zero point 0 and all 256 codes."""
    low, high = -amax, amax
    if observed is not None:
        low, high = max(low, min(float(observed[0]), 0.0)), min(high, max(float(observed[1]), 0.0))
    scale = (high - low) / CPU_ACTIVATION_QMAX  # the caller floors it; the zero point uses the floored one
    zero = np.clip(np.rint(-low / max(scale, scale_floor)), 0, CPU_ACTIVATION_QMAX)
    return scale, np.array(zero, np.uint8)


def _quantized_weight(
    model: onnx.ModelProto,
    graph: gs.Graph,
    weight: gs.Constant,
    axis: int,
    scale_floor: float,
    report: Int8Report,
    name: str,
    fmt: QuantFormat = INT8,
) -> gs.Variable:
    """INT8 (or FP8) initializer + per-channel DequantizeLinear standing in for ``weight``.

    Per channel for FP8 too: ModelOpt's ONNX FP8 recipe quantizes weights per
    output channel (its INT8 per-channel scales times 448/127), and TensorRT
    builds that graph. The weight is read, and its codes written, one at a time (on disk when
    ``model``'s weights are: ``trtopt.graph.new_constant``)."""
    values = np.asarray(constant_values(weight), np.float32)
    reduce = tuple(d for d in range(values.ndim) if d != axis)
    peak = np.max(np.abs(values), axis=reduce)
    scale = (peak / fmt.weight_qmax).astype(np.float32)
    if np.any(scale < scale_floor):
        report.floored_scales.append(weight.name)
        scale = np.maximum(scale, np.float32(scale_floor))
    shape = [1] * values.ndim
    shape[axis] = -1
    q = fmt.encode(values / scale.reshape(shape))
    dq = gs.Variable(f"{weight.name}__dq", np.float32, list(values.shape))
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            name,
            {"axis": axis},
            [
                new_constant(model, f"{weight.name}__{fmt.name}", q),
                new_constant(model, f"{weight.name}__scale", scale),
                new_constant(model, f"{weight.name}__zero_point", fmt.zero(scale.shape)),
            ],
            [dq],
        )
    )
    report.dq_peaks[dq.name] = float(peak.max()) if peak.size else 0.0
    return dq
