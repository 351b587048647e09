"""Torch module paths on ONNX nodes: read them, keep them through every pass, name nodes after them.

The torch.export-based exporter records on each node where in the model it
came from: ``pkg.torch.onnx.name_scopes`` is the list of module paths from the
root down, ending with the FX node's own name, for example
``['', 'encoder', 'encoder.layers.1', 'encoder.layers.1.linear2', 'linear_7']``.
The module a node belongs to is the last module path in that list
(``encoder.layers.1.linear2``; ``''`` is the model itself).

trtopt keeps that metadata through every pass and names every node after it,
once, right after export and cleanup (``assign_names``):
``encoder.layers.1.linear2/MatMul``, with ``_1``, ``_2`` ... for the second and
further nodes of one op type in one module. TensorRT names its layers after
ONNX nodes, so the engine inspector, TensorRT's per-layer profiler and its
parser errors name modules too. Nodes a pass adds (Cast, QuantizeLinear,
DequantizeLinear, SmoothQuant's Mul) are named after the node they serve and
carry its module path (``inherit``).

What is kept of the exporter's metadata: ``namespace``,
``pkg.torch.onnx.name_scopes`` and ``pkg.torch.onnx.class_hierarchy``, plus
trtopt's own ``trtopt.module`` (the module path). The exporter's stack traces
and FX node text are dropped: they hold the build machine's file paths and line
numbers, and since the graph's bytes key the engine cache, an edit to a comment
in the model's source would otherwise force a new TensorRT build.

Tensor names are left as the exporter wrote them: TensorRT's calibration cache
and ``precision_report.activation_amax`` are keyed by tensor, and renaming
tensors would make every calibration cache written before unusable.

Graphs without this metadata (the TorchScript exporter's, a user's ONNX file)
keep their node names; one log line says so.
"""

from __future__ import annotations

import ast
import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping

import onnx

logger = logging.getLogger(__name__)

MODULE_KEY = "trtopt.module"
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
ADDED_BY_KEY = "trtopt.added_by"  # on nodes a pass added: "fp16", "int8", "smoothquant"
# The metadata a node keeps, and that a node inserted for it inherits.
KEPT_KEYS = ("namespace", NAME_SCOPES_KEY, "pkg.torch.onnx.class_hierarchy", MODULE_KEY, ADDED_BY_KEY)
ROOT = "(root)"
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # how the model itself (module path '') is shown in by-module tables


def _metadata(node: onnx.NodeProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in node.metadata_props}


def module_of(node: onnx.NodeProto) -> str | None:
    """The module path ``node`` came from ('' for the model itself), or None when it carries none."""
    meta = _metadata(node)
    if MODULE_KEY in meta:
        return meta[MODULE_KEY]
    scopes = meta.get(NAME_SCOPES_KEY)
    if scopes is None:
        return None
    try:
        parsed = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(parsed, list) or not parsed:
        return None
    fx_node = str(parsed[-1])
    if (
        fx_node.startswith(("_native_batch_norm", "batch_norm"))
        and node.op_type in _WEIGHTED
        and len(node.input) > 1
        and node.input[1].endswith(".weight")
    ):
        # The exporter folds an eval BatchNorm into the Conv before it, and the fused node keeps
        # the BatchNorm's metadata; the weight still bears its own module's parameter name.
        return node.input[1][: -len(".weight")]
    # The last entry is the FX node (e.g. 'linear_7'); the one before it its module.
    return str(parsed[-2]) if len(parsed) >= 2 else ""


def node_modules(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> module path, for the nodes of ``model`` that carry one."""
    modules = {}
    for node in model.graph.node:
        module = module_of(node)
        if module is not None:
            modules[node.name] = module
    return modules


def set_metadata(node: onnx.NodeProto, values: Mapping[str, str]) -> None:
    """Replace ``node``'s metadata with the ``KEPT_KEYS`` of ``values``."""
    del node.metadata_props[:]
    for key in KEPT_KEYS:
        if key in values:
            entry = node.metadata_props.add()
            entry.key, entry.value = key, values[key]


def carry_metadata(
    source: onnx.ModelProto, result: onnx.ModelProto, inherit: Mapping[str, str] | None = None
) -> onnx.ModelProto:
    """Give ``result``'s nodes the metadata their namesakes in ``source`` carry; returns ``result``.

    onnx-graphsurgeon and Polygraphy drop node metadata, so every pass that goes
    through them calls this on its output. ``inherit`` maps a node the pass added
    to the (``source``) node it serves, whose module path it takes.
    """
    meta = {node.name: _metadata(node) for node in source.graph.node if node.metadata_props}
    if not meta:
        return result
    inherit = inherit or {}
    for node in result.graph.node:
        values = meta.get(node.name) or meta.get(inherit.get(node.name, ""))
        if values and not node.metadata_props:
            set_metadata(node, values)
    return result


def inherit_metadata(node: onnx.NodeProto, served: onnx.NodeProto, added_by: str) -> None:
    """``node`` (added by the pass ``added_by``) takes the module path of ``served``."""
    set_metadata(node, {**_metadata(served), ADDED_BY_KEY: added_by})


def mark_added(model: onnx.ModelProto, added: Iterable[str], pass_name: str) -> None:
    """Record on the nodes named in ``added`` that the pass ``pass_name`` inserted them."""
    added = set(added)
    for node in model.graph.node:
        if node.name in added:
            set_metadata(node, {**_metadata(node), ADDED_BY_KEY: pass_name})


def added_by(node: onnx.NodeProto) -> str | None:
    """The pass that inserted ``node`` ("fp16", "int8", "smoothquant"), or None for the model's own."""
    return _metadata(node).get(ADDED_BY_KEY)


def assign_names(model: onnx.ModelProto, *, source: str = "the graph") -> onnx.ModelProto:
    """Name every node after its module path and op (in place); returns ``model``.

    ``encoder.layers.1.linear2/MatMul``; a module's second MatMul is ``.../MatMul_1``.
    A node the exporter left without metadata (rare: nodes its optimizer made)
    inherits the module of the first node it feeds, else of the node that feeds it.
    Graphs without module metadata keep their node names (one INFO line says so);
    only empty or repeated names are made unique, since every pass finds nodes by
    name. A graph named by trtopt before (it carries ``trtopt.module``) is left as it is.
    """
    nodes = list(model.graph.node)
    if any(MODULE_KEY in _metadata(n) for n in nodes):
        return model  # named by trtopt already (e.g. a graph from export_onnx)
    modules = [module_of(n) for n in nodes]
    if not any(m is not None for m in modules):
        logger.info(
            "%s carries no torch module paths (pkg.torch.onnx.name_scopes), so nodes keep their ONNX "
            "names and reports name ONNX nodes", source,
        )
        _dedupe(nodes)
        return model
    _fill_missing(nodes, modules)
    counts: dict[tuple[str, str], int] = {}
    for node, module in zip(nodes, modules):
        meta = _metadata(node)
        meta[MODULE_KEY] = module or ""
        set_metadata(node, meta)
        key = (module or "", node.op_type)
        index = counts.get(key, 0)
        counts[key] = index + 1
        base = f"{module}/{node.op_type}" if module else node.op_type
        node.name = base if index == 0 else f"{base}_{index}"
    return model


def _fill_missing(nodes: list[onnx.NodeProto], modules: list[str | None]) -> None:
    """Nodes without a module path take their first consumer's, else their producer's."""
    if all(m is not None for m in modules):
        return
    producers: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.output:
            producers[name] = i
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    for _ in range(len(nodes)):  # chains of unnamed nodes resolve one link per round
        changed = False
        for i, node in enumerate(nodes):
            if modules[i] is not None:
                continue
            near = [j for out in node.output for j in consumers.get(out, [])]
            near += [producers[name] for name in node.input if name in producers]
            found = next((modules[j] for j in near if modules[j] is not None), None)
            if found is not None:
                modules[i], changed = found, True
        if not changed:
            break
    for i in range(len(modules)):
        if modules[i] is None:
            modules[i] = ""


def _dedupe(nodes: list[onnx.NodeProto]) -> None:
    seen: set[str] = {n.name for n in nodes if n.name}
    used: set[str] = set()
    for index, node in enumerate(nodes):
        name = node.name
        if name and name not in used:
            used.add(name)
            continue
        base = name or node.op_type
        candidate, k = f"{base}_{index}", index
        while candidate in seen or candidate in used:
            k += 1
            candidate = f"{base}_{k}"
        node.name = candidate
        used.add(candidate)


# ----------------------------------------------------------------- exclusions


def ancestors(module: str) -> list[str]:
    """``a.b.c`` -> ``['a', 'a.b', 'a.b.c']``."""
    parts = module.split(".") if module else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def matches_module(module: str | None, pattern: str) -> bool:
    """Whether the glob ``pattern`` names ``module`` or a module containing it.

    So ``encoder.layers.1`` excludes everything inside that layer, and
    ``encoder.layers.*.linear1`` every layer's first Linear.
    """
    if module is None:
        return False
    return any(fnmatch.fnmatchcase(path, pattern) for path in ancestors(module))


def excluded_by(name: str, module: str | None, patterns: Iterable[str]) -> str | None:
    """The reason a node (``name``, ``module``) is excluded by the glob ``patterns``, else None."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return f"name matches excluded pattern {pattern!r}"
        if matches_module(module, pattern):
            return f"module {module} matches excluded pattern {pattern!r}"
    return None


# ------------------------------------------------------------ profiles


def split_layer_name(name: str) -> list[str]:
    """The node names a fused layer name may hold (TensorRT: ``a + b``, ``PWN(a, b)``)."""
    for sep in ("(", ")", ",", " + ", "+"):
        name = name.replace(sep, " ")
    return [part for part in name.split() if part]


def _holds_token(layer: str, tensor: str) -> bool:
    """Whether ``tensor`` appears in ``layer`` as a whole ``_``-separated part (``InsertedX_relu_1_nchwc``)."""
    return re.search(rf"(?:^|_){re.escape(tensor)}(?:$|_)", layer) is not None


def tensor_producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that produces it."""
    return {name: node for node in model.graph.node for name in node.output}


def layer_module(
    layer: str,
    modules: Mapping[str, str],
    producers: Mapping[str, onnx.NodeProto] | None = None,
    op_type: str | None = None,
) -> str | None:
    """The module a profiled layer belongs to: its first node that ``modules`` knows.

    A layer may be one node (``enc.blocks.0.0/Gemm``), several fused nodes
    (TensorRT's ``a + b``, ONNX Runtime's fused nodes) or a node a backend made
    from ours (``<node>_token_3``); it is attributed to the first known node it
    names, else to the longest known node name it starts with. ONNX Runtime
    names some nodes after a tensor instead (``relu_1_nchwc``: a Conv fused with
    the ReLU whose output is ``relu_1``; ``InsertedPrecisionFreeCast_<tensor>``):
    such a layer goes to the producer of the longest tensor name (``producers``)
    it holds as a whole ``_``-separated part, or, when ``op_type`` (the layer's op: ``Conv``,
    ``FusedConv``, ``QLinearConv``) names an op a few nodes up from there, to that op.
    """
    if layer in modules:
        return modules[layer]
    for part in split_layer_name(layer):
        if part in modules:
            return modules[part]
    best = max((n for n in modules if n and layer.startswith(n)), key=len, default=None)
    if best is not None:
        return modules[best]
    producers = producers or {}
    best = max((t for t in producers if t and t in layer and _holds_token(layer, t)), key=len, default=None)
    if best is None:
        return None
    node = producers[best]
    if op_type:
        wanted = {op_type, op_type.removeprefix("Fused"), op_type.removeprefix("QLinear")}
        current: onnx.NodeProto | None = node
        for _ in range(4):  # through the activation, norm or Q/DQ fused after the op
            if current is None:
                break
            if current.op_type in wanted:
                node = current
                break
            current = producers.get(current.input[0]) if current.input else None
    return modules.get(node.name)
