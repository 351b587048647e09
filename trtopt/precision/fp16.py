"""FP16 conversion with an FP32 keep-list (docs/precision.md, "FP16").

TensorRT 11 is strongly typed, so "run in FP16" means the graph itself is FP16:
float32 initializers and activations become float16, and any node that must
stay in FP32 gets explicit Casts around it. A node stays FP32 when

- the user excludes it (glob on the node name or its torch module path, or
  its op type);
- its inputs or outputs reach ``threshold`` on the calibration data
  (overflow shows first in normalizations and reductions; FP16 max is 65504);
- one of its float weights does not fit FP16;
- its op has no FP16 form in ONNX, or runs subgraphs, or sets its output type
  by attribute (we cannot follow the types inside it);
- the converted graph produced Inf/NaN at it on the calibration data (the
  repair loop in ``trtopt.precision`` adds those).

Polygraphy's ``convert_to_fp16`` (onnxconverter-common underneath) has no way
to keep nodes by measured range, and blocks ops by an ORT-specific list; this
pass is small and follows each op's ONNX schema instead.

Graph inputs and outputs keep their dtype: a Cast follows each float32 input
and precedes each float32 output, so the compiled callable still takes and
returns float32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnx_graphsurgeon as gs

from ..config import DEFAULT_FP16_THRESHOLD
from ..errors import GraphError
from ..graph import check_model, constant_values, export_graph, import_graph, new_constant
from ..names import carry_metadata, excluded_by, mark_added, node_modules
from .masks import MaskReport, MaskRewrite

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0

# Ops whose output dtype an attribute decides; we only know how to retarget these two.
_RETYPED_BY_ATTRIBUTE = {"Cast", "ConstantOfShape"}
_TYPE_ATTRIBUTES = ("dtype", "to")


@dataclass(frozen=True)
class KeptNode:
    """A node left in FP32 (or out of INT8), and why; ``module`` is its torch module path, when known."""

    name: str
    op: str
    reason: str
    module: str | None = None

    def to_json(self) -> dict[str, object]:
        record: dict[str, object] = {"node": self.name, "op": self.op, "reason": self.reason}
        if self.module is not None:
            record["module"] = self.module
        return record


@dataclass
class Fp16Report:
    """What the FP16 pass did: the FP32 keep-list with reasons, and the Casts it added."""

    kept: list[KeptNode] = field(default_factory=list)
    converted_nodes: int = 0
    casts_added: int = 0
    # Attention-mask constants made FP16-safe before conversion (``trtopt.precision.masks``).
    masks: list[MaskRewrite] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "fp16_nodes": self.converted_nodes,
            "casts_added": self.casts_added,
            "kept_fp32": [k.to_json() for k in self.kept],
            "fp16_safe_masks": [m.to_json() for m in self.masks],
        }


def _is_float32(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and _np_dtype(tensor.dtype) == np.float32


def _np_dtype(dtype: npt.DTypeLike) -> np.dtype | None:
    try:
        return np.dtype(dtype)
    except TypeError:
        return None  # ONNX-only types (bfloat16, float8) have no numpy dtype


def _schema(node: gs.Node, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(node.op, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None


def _allows_fp16(schema: onnx.defs.OpSchema, index: int, output: bool) -> bool:
    """Whether formal input/output ``index`` of ``schema`` accepts tensor(float16)."""
    params = schema.outputs if output else schema.inputs
    if not params:
        return False
    param = params[min(index, len(params) - 1)]  # variadic: the last formal repeats
    constraints = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    return "tensor(float16)" in constraints.get(param.type_str, [param.type_str])


def user_exclusion(
    node: gs.Node, name_patterns: Iterable[str], op_types: Iterable[str], module: str | None = None
) -> str | None:
    """The reason the user's exclusions name ``node``, else None.

    ``name_patterns`` are globs matched against the node's name and against its
    torch module path ``module`` and the modules containing it
    (``trtopt.names.matches_module``); ``op_types`` are op types.
    """
    if node.op in set(op_types):
        return f"op type {node.op} excluded by the user"
    return excluded_by(node.name, module, name_patterns)


def fp16_keep_list(
    graph: gs.Graph,
    ranges: Mapping[str, float] | None,
    *,
    opset: int,
    threshold: float = DEFAULT_FP16_THRESHOLD,
    exclude_nodes: Iterable[str] = (),
    exclude_op_types: Iterable[str] = (),
    mask_offsets: Mapping[str, float] | None = None,
    modules: Mapping[str, str] | None = None,
) -> dict[str, KeptNode]:
    """Decide which float nodes stay FP32; ``ranges`` maps tensor name -> max |x| seen.

    ``modules`` (node name -> torch module path) lets exclusions name modules and
    goes into each ``KeptNode``.

    ``mask_offsets`` (tensor -> magnitude of the FP16-safe attention mask it
    carries) is taken off those tensors' ranges: the masked scores reach
    32768 by design, and the mask was chosen so that they stay finite in FP16.
    """
    ranges = ranges or {}
    offsets = mask_offsets or {}
    modules = modules or {}
    exclude_nodes, exclude_op_types = tuple(exclude_nodes), tuple(exclude_op_types)
    kept: dict[str, KeptNode] = {}
    for node in graph.nodes:
        tensors = [*node.inputs, *node.outputs]
        if not any(_is_float32(t) for t in tensors):
            continue  # shape arithmetic and the like: nothing to convert
        reason = user_exclusion(node, exclude_nodes, exclude_op_types, modules.get(node.name))
        if reason is None:
            reason = _structural_reason(node, opset)
        if reason is None:
            over = [
                (t.name, ranges[t.name])
                for t in tensors
                if _is_float32(t) and t.name in ranges and not ranges[t.name] - offsets.get(t.name, 0.0) < threshold
            ]
            if over:
                name, value = max(over, key=lambda item: item[1])
                reason = f"activation {name!r} reaches {value:.4g} on the calibration data (threshold {threshold:g})"
        if reason is None:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and _is_float32(t) and int(np.prod(t.shape)):
                    peak = float(np.max(np.abs(constant_values(t))))  # one weight at a time
                    if not peak <= FP16_MAX:
                        reason = f"weight {t.name!r} holds {peak:.4g}, beyond FP16's {FP16_MAX:g}"
                        break
        if reason is not None:
            kept[node.name] = KeptNode(node.name, node.op, reason, modules.get(node.name))
    return kept


def _structural_reason(node: gs.Node, opset: int) -> str | None:
    if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return "runs subgraphs (If/Loop/Scan); their types are not converted"
    if node.op not in _RETYPED_BY_ATTRIBUTE and any(a in node.attrs for a in _TYPE_ATTRIBUTES):
        return f"{node.op} sets its output type by attribute"
    schema = _schema(node, opset)
    if schema is None:
        return f"no ONNX schema for {node.domain or 'ai.onnx'}::{node.op} at opset {opset}"
    float_outputs = [i for i, t in enumerate(node.outputs) if _is_float32(t)]
    float_inputs = [i for i, t in enumerate(node.inputs) if _is_float32(t)]
    if not any(_allows_fp16(schema, i, True) for i in float_outputs) and not any(
        _allows_fp16(schema, i, False) for i in float_inputs
    ):
        return f"{node.op} has no FP16 form in ONNX"
    return None


def convert_to_fp16(
    model: onnx.ModelProto,
    ranges: Mapping[str, float] | None = None,
    *,
    threshold: float = DEFAULT_FP16_THRESHOLD,
    exclude_nodes: Iterable[str] = (),
    exclude_op_types: Iterable[str] = (),
    keep: Mapping[str, str] | None = None,
    masks: MaskReport | None = None,
) -> tuple[onnx.ModelProto, Fp16Report]:
    """Return an FP16 copy of ``model`` (FP32 I/O) and a report of the nodes kept FP32.

    ``ranges`` (tensor name -> max |x| on calibration data) drives the keep-list;
    without it only weights, exclusions and op support decide. ``keep`` adds
    nodes (name -> reason) to keep FP32, e.g. those the Inf/NaN repair found.
    ``masks`` is what ``make_masks_fp16_safe`` did to ``model`` beforehand:
    it is reported, and the tensors carrying those masks are judged without them.
    """
    opset = _opset(model)
    modules = node_modules(model)
    graph = import_graph(_with_types(model))
    kept = fp16_keep_list(
        graph,
        ranges,
        opset=opset,
        threshold=threshold,
        exclude_nodes=exclude_nodes,
        exclude_op_types=exclude_op_types,
        mask_offsets=masks.offsets if masks else None,
        modules=modules,
    )
    _keep_requested(kept, graph, keep or {}, modules)
    _keep_dequantize_with_its_users(kept, graph, modules)
    _keep_users_of_fp32_dequantize(kept, graph, modules)
    half_nodes = [
        n
        for n in graph.nodes
        if n.name not in kept and any(_is_float32(t) for t in [*n.inputs, *n.outputs])
    ]
    report = Fp16Report(
        kept=list(kept.values()), converted_nodes=len(half_nodes), masks=list(masks.rewrites) if masks else []
    )
    original_nodes = list(graph.nodes)  # the Casts added below are already typed
    rewrite = _Fp16Rewrite(graph, opset, model)
    rewrite.retype_outputs(half_nodes)
    rewrite.retype_inputs(original_nodes, {id(n) for n in half_nodes})
    report.casts_added = rewrite.casts_added
    out_model = _export_converted(model, graph, rewrite.served)
    logger.info(
        "fp16: %d nodes in FP16, %d kept FP32, %d Casts added",
        report.converted_nodes,
        len(report.kept),
        report.casts_added,
    )
    return out_model, report


def _keep_requested(
    kept: dict[str, KeptNode], graph: gs.Graph, keep: Mapping[str, str], modules: Mapping[str, str]
) -> None:
    """Add the caller's ``keep`` (node name -> reason) to ``kept``; unknown names are ignored."""
    by_name = {n.name: n for n in graph.nodes}
    for name, reason in keep.items():
        if name in by_name and name not in kept:
            kept[name] = KeptNode(name, by_name[name].op, reason, modules.get(name))


def _keep_dequantize_with_its_users(kept: dict[str, KeptNode], graph: gs.Graph, modules: Mapping[str, str]) -> None:
    """Keep FP32 each DequantizeLinear whose every consumer is kept FP32.

    A DequantizeLinear takes its consumers' precision: no Cast may separate it from the op
    it feeds, or TensorRT cannot fuse the pair (and per-channel weights lose their op).
    """
    for node in graph.nodes:
        users = node.outputs[0].outputs if node.op == "DequantizeLinear" else []
        if users and node.name not in kept and all(u.name in kept for u in users):
            kept[node.name] = KeptNode(node.name, node.op, "feeds only nodes kept in FP32", modules.get(node.name))


def _keep_users_of_fp32_dequantize(kept: dict[str, KeptNode], graph: gs.Graph, modules: Mapping[str, str]) -> None:
    """Keep FP32 every node reading a DequantizeLinear that stays FP32.

    The other half of ``_keep_dequantize_with_its_users``: before opset 19 a DequantizeLinear
    has no FP16 form (its scale is FP32), so an FP16 consumer would read it through a Cast.
    TensorRT fuses a DequantizeLinear only into the op it feeds directly, and a per-channel
    weight's scales belong to that op alone (``validate_qdq`` refuses them on a Cast), so the
    consumer stays FP32 with its INT8 inputs and the Cast moves to its output.
    """
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or node.name not in kept:
            continue
        for user in node.outputs[0].outputs:
            if user.name not in kept and user.op != "QuantizeLinear":
                reason = f"reads {node.name!r}, which stays FP32 ({kept[node.name].reason})"
                kept[user.name] = KeptNode(user.name, user.op, reason, modules.get(user.name))


class _Fp16Rewrite:
    """Retypes a graph's FP16 nodes in place and adds a Cast at every FP16/FP32 boundary.

    Each Cast is named after the node it serves and recorded in ``served`` (Cast
    name -> that node), so it takes the node's torch module path.
    """

    def __init__(self, graph: gs.Graph, opset: int, model: onnx.ModelProto) -> None:
        self.graph = graph
        self.model = model  # its weights directory takes the FP16 weights when its weights are on disk
        self.opset = opset
        self.served: dict[str, str] = {}
        self.converted: set[str] = set()  # activations turned from float32 into float16
        self._output_casts = 0
        self._input_casts: dict[tuple[str, int], gs.Variable] = {}  # (tensor, to) -> cast tensor, shared
        self._half_constants: dict[str, gs.Constant] = {}

    @property
    def casts_added(self) -> int:
        return self._output_casts + len(self._input_casts)

    def retype_outputs(self, half_nodes: Iterable[gs.Node]) -> None:
        """Outputs of FP16 nodes become float16; graph outputs keep float32 behind a Cast."""
        graph_outputs = {id(t) for t in self.graph.outputs}
        for node in half_nodes:
            schema = _schema(node, self.opset)
            if schema is None:  # fp16_keep_list keeps every float node without a schema in FP32
                raise GraphError(
                    f"FP16 pass: {node.op} node {node.name!r} has no ONNX schema at opset {self.opset} but was not "
                    f"kept in FP32; this is a trtopt bug, please report it (exclude_nodes=[{node.name!r}] avoids it)"
                )
            _retarget_attributes(node)
            for i, out in enumerate(node.outputs):
                if not _is_float32(out) or not _allows_fp16(schema, i, True):
                    continue
                if id(out) in graph_outputs:
                    self._cast_graph_output(node, i, out)
                else:
                    out.dtype = np.float16
                    self.converted.add(out.name)

    def _cast_graph_output(self, node: gs.Node, index: int, out: gs.Variable) -> None:
        half = gs.Variable(f"{out.name}__fp16", np.float16, out.shape)
        for consumer in list(out.outputs):
            consumer.inputs[consumer.inputs.index(out)] = half
        node.outputs[index] = half
        name = f"{node.name}/Cast_out{index}_to_fp32"
        self.graph.nodes.append(gs.Node("Cast", name, {"to": onnx.TensorProto.FLOAT}, [half], [out]))
        self.served[name] = node.name
        self._output_casts += 1
        self.converted.add(half.name)

    def retype_inputs(self, nodes: Iterable[gs.Node], half_ids: set[int]) -> None:
        """Every input gets the dtype its consumer (FP16 when its id is in ``half_ids``) now runs in."""
        for node in nodes:
            schema = _schema(node, self.opset) if id(node) in half_ids else None
            for i, tensor in enumerate(node.inputs):
                want_half = schema is not None and _allows_fp16(schema, i, False)
                replacement = self._input_for(node, i, tensor, want_half)
                if replacement is not tensor:  # reassigning reorders the tensor's consumers: only on change
                    node.inputs[i] = replacement

    def _input_for(self, node: gs.Node, index: int, tensor: gs.Tensor, want_half: bool) -> gs.Tensor:
        if isinstance(tensor, gs.Constant):
            return self._half_constant(tensor) if want_half and _is_float32(tensor) else tensor
        if tensor.name in self.converted and not want_half:
            return self._cast(tensor, onnx.TensorProto.FLOAT, node, index)
        if want_half and _is_float32(tensor) and tensor.name not in self.converted:
            return self._cast(tensor, onnx.TensorProto.FLOAT16, node, index)
        return tensor

    def _half_constant(self, tensor: gs.Constant) -> gs.Constant:
        if tensor.name not in self._half_constants:
            half = constant_values(tensor).astype(np.float16)
            self._half_constants[tensor.name] = new_constant(self.model, f"{tensor.name}__fp16", half)
        return self._half_constants[tensor.name]

    def _cast(self, tensor: gs.Variable, to: int, consumer: gs.Node, index: int) -> gs.Variable:
        """``tensor`` cast to ``to``; one Cast per (tensor, type), named after its first consumer."""
        key = (tensor.name, to)
        if key not in self._input_casts:
            dtype = np.float16 if to == onnx.TensorProto.FLOAT16 else np.float32
            out = gs.Variable(f"{tensor.name}__cast_{np.dtype(dtype).name}", dtype, tensor.shape)
            name = f"{consumer.name}/Cast_in{index}_to_{'fp16' if dtype == np.float16 else 'fp32'}"
            self.graph.nodes.append(gs.Node("Cast", name, {"to": to}, [tensor], [out]))
            self.served[name] = consumer.name
            self._input_casts[key] = out
        return self._input_casts[key]


def _export_converted(model: onnx.ModelProto, graph: gs.Graph, served: Mapping[str, str]) -> onnx.ModelProto:
    """The converted graph as a checked model, with ``model``'s metadata and the Casts marked as added."""
    graph.cleanup().toposort()
    out_model = export_graph(graph, model)
    del out_model.graph.value_info[:]  # stale float32 entries; inference rebuilds them
    out_model = carry_metadata(model, check_model(out_model), served)
    mark_added(out_model, served, "fp16")
    return out_model


def _retarget_attributes(node: gs.Node) -> None:
    """Make attribute-typed float32 outputs float16 (Cast's ``to``, ConstantOfShape's value)."""
    if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
        node.attrs["to"] = onnx.TensorProto.FLOAT16
    value = node.attrs.get("value")
    if isinstance(value, gs.Constant) and value.values.dtype == np.float32:
        node.attrs["value"] = gs.Constant(value.name, value.values.astype(np.float16))


def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every activation's dtype known (the pass decides by dtype)."""
    typed = {vi.name for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    if all(o in typed for n in model.graph.node for o in n.output if o):
        return model
    return check_model(model)


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return onnx.defs.onnx_opset_version()
