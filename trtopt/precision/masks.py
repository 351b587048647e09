"""FP16-safe additive attention masks: rewrite ``finfo(float32).min`` / ``-inf`` mask constants.

Attention code builds its additive mask from a constant far beyond FP16's
range: Hugging Face uses ``torch.finfo(float32).min`` (about -3.4e38),
``nn.MultiheadAttention`` and ``scaled_dot_product_attention`` use ``-inf``,
older code ``-1e9``. Measured in FP32 such a mask makes the masked scores,
and so the ``Where``/``Add``/``Softmax`` of every attention block, look like
an overflow, and the FP16 pass would pin all of them to FP32 (a Cast pair
around every softmax on TensorRT); a ``-inf`` mask even stops the range
measurement, which takes it for a broken model.

This pass finds those constants and replaces their huge negative entries by
``MASK_VALUE`` (``-2**15``, halved for each further mask summed into the same
softmax input). The value is chosen so that

- softmax outputs do not change: ``exp(-32768 + s - max)`` is exactly 0 in
  FP16 and FP32 for any row that keeps one unmasked position, as with the
  original constant;
- adding a score ``s`` cannot overflow to ``-inf`` in FP16 (|s| up to 32735),
  so a fully masked row never becomes all ``-inf``, which softmax turns into NaN;
- in FP16 the spacing at 2**15 is 32, so scores with |s| < 16 round into the
  mask, and a fully masked row gets the uniform weights that FP32 gives with
  ``finfo.min`` (an Add left in FP32 does not round, and such a row then
  follows its scores). With a ``-inf`` mask FP32 gives NaN there (or 0 after
  the exported SDPA's NaN guard); the rewritten graph gives a finite average.

Only a constant whose every route ends in a Softmax/LogSoftmax input through
mask-building ops is rewritten (see ``_follow``): Cast and shape ops, Add,
Sub, Where's value inputs, and Mul/Div by a constant or by a tensor computed
from no weights (``(1 - mask) * finfo.min``). A constant that also reaches a
graph output, another kind of op, or is multiplied by scores (a temperature,
not a mask) is left alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import constant_values, export_graph, import_graph, new_constant
from ..names import carry_metadata

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
MASK_VALUE = -(2.0**15)

_SOFTMAX_OPS = ("Softmax", "LogSoftmax")
# Ops that only read a tensor's shape: a mask reaching them is harmless.
_SHAPE_READERS = ("Shape", "Size")
# Ops that move or copy mask values without changing them, through their data input 0.
_MOVERS = ("Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Expand", "Tile", "Slice",
           "Gather", "Flatten")
# Ops whose output is computed from weights or embeddings: tensors downstream of them are data (scores).
_WEIGHTED = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")


@dataclass(frozen=True)
class MaskRewrite:
    """One mask constant made FP16-safe: its huge negative entries ``old`` became ``new``."""

    constant: str
    old: float
    new: float
    softmax: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        old = self.old if math.isfinite(self.old) else str(self.old)  # JSON has no -inf
        return {"constant": self.constant, "from": old, "to": self.new, "softmax": list(self.softmax)}


@dataclass
class MaskReport:
    """The rewrites, and the magnitude the mask adds to each tensor on its way to a softmax.

    ``offsets`` lets the FP16 keep-list judge those tensors by what is left
    once the (now FP16-safe) mask is taken out, instead of keeping every
    attention block FP32 because its masked scores reach 32768 by design.
    """

    rewrites: list[MaskRewrite] = field(default_factory=list)
    offsets: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> list[dict[str, object]]:
        return [r.to_json() for r in self.rewrites]


def _is_float(tensor: gs.Tensor) -> bool:
    try:
        return tensor.dtype is not None and np.dtype(tensor.dtype).kind == "f"
    except TypeError:
        return False


def _huge_negative(values: np.ndarray) -> bool:
    """Mask-like: some entries at or below -FP16_MAX (-inf included), none hugely positive or NaN."""
    if values.dtype.kind != "f" or values.size == 0 or np.isnan(values).any():
        return False
    return bool((values <= -FP16_MAX).any()) and not bool((values >= FP16_MAX).any())


def _data_tensors(graph: gs.Graph) -> set[str]:
    """Names of tensors computed from weights or embeddings: scores and activations, not masks."""
    data: set[str] = set()
    for node in graph.nodes:  # toposorted
        if node.op in _SHAPE_READERS:
            continue
        seeded = node.op in _WEIGHTED or (
            node.op == "Gather" and isinstance(node.inputs[0], gs.Constant) and _is_float(node.inputs[0])
        )
        if seeded or any(t.name in data for t in node.inputs if not isinstance(t, gs.Constant)):
            data.update(t.name for t in node.outputs)
    return data


def _constant_sign_and_scale(tensor: gs.Tensor) -> tuple[int, float] | None:
    """(sign, max |c|) of a constant multiplier of one sign, else None."""
    if not isinstance(tensor, gs.Constant) or not _is_float(tensor) or not int(np.prod(tensor.shape)):
        return None
    values = np.asarray(constant_values(tensor), dtype=np.float64)
    if not np.isfinite(values).all() or (values > 0).any() and (values < 0).any():
        return None
    return (-1 if (values < 0).any() else 1), float(np.abs(values).max())


@dataclass
class _Route:
    """What following one use of a mask constant found."""

    ok: bool = True
    softmax: set[str] = field(default_factory=set)
    tensors: set[str] = field(default_factory=set)
    why_not: str = ""

    def fail(self, why: str) -> None:
        if self.ok:
            self.ok, self.why_not = False, why


def _follow(
    node: gs.Node, index: int, sign: int, scale: float, data: set[str], outputs: set[str], route: _Route,
    seen: set[tuple[str, int, int]],
) -> None:
    """Follow the mask into input ``index`` of ``node``; ``sign`` -1 while its huge entries are negative.

    ``scale`` bounds how much the route has multiplied the mask by: a route
    that grows it (Mul by 4) could overflow FP16 after the rewrite, so it
    fails, as does anything that is not plainly building or applying a mask.
    """
    key = (node.name, index, sign)
    if key in seen or not route.ok:
        return
    seen.add(key)
    op = node.op
    if op in _SHAPE_READERS:
        return
    if op in _SOFTMAX_OPS:
        if sign > 0:
            route.fail(f"reaches {node.name} ({op}) as a large positive value")
        route.softmax.add(node.name)
        return
    others = [t for i, t in enumerate(node.inputs) if i != index]
    if op in _MOVERS:
        if index != 0:
            return route.fail(f"is a shape or index input of {node.name} ({op})")
        if op == "Cast" and not _is_float(node.outputs[0]):
            return route.fail(f"is cast to a non-float type by {node.name}")
    elif op == "Concat":
        pass
    elif op == "Add":
        pass
    elif op == "Sub":
        sign = sign if index == 0 else -sign
    elif op == "Neg":
        sign = -sign
    elif op == "Where":
        if index == 0:
            return route.fail(f"is the condition of {node.name} (Where)")
    elif op in ("Mul", "Div"):
        if op == "Div" and index != 0:
            return route.fail(f"divides by it in {node.name} (Div)")
        (other,) = others
        constant = _constant_sign_and_scale(other)
        if constant is not None:
            factor_sign, magnitude = constant
            sign *= factor_sign
            scale *= magnitude if op == "Mul" else (1.0 / magnitude if magnitude else math.inf)
        elif other.name in data:
            # Scores times a huge constant is a temperature, not a mask.
            return route.fail(f"multiplies activations computed from weights in {node.name} ({op})")
        # else: a factor built from the mask input itself, such as (1 - mask) in [0, 1].
        if scale > 1.0:
            return route.fail(f"is scaled up by {node.name} ({op}); the rewritten value could overflow")
    else:
        return route.fail(f"reaches {node.name} ({op}), which does not build or apply a mask")
    for out in node.outputs:
        if out.name in outputs:
            return route.fail(f"reaches the graph output {out.name!r}")
        route.tensors.add(out.name)
        for consumer in out.outputs:
            for i, tensor in enumerate(consumer.inputs):
                if tensor is out:
                    _follow(consumer, i, sign, scale, data, outputs, route, seen)


def _mask_counts(graph: gs.Graph, tensors: set[str], sources: Mapping[str, float]) -> dict[str, float]:
    """How many mask magnitudes each mask tensor carries (Add of two masks carries 2).

    ``sources`` maps each rewritten constant's new name to 1.0. Mul/Div by a
    constant scale the count, Where and Concat take the larger branch.
    """
    counts = dict(sources)
    for node in graph.nodes:
        outs = [t for t in node.outputs if t.name in tensors]
        if not outs:
            continue
        ins = [counts.get(t.name, 0.0) for t in node.inputs]
        if node.op in ("Add", "Sub"):
            count = sum(ins)
        elif node.op in ("Mul", "Div"):
            count = max(ins)
            constant = next((t for t in node.inputs if counts.get(t.name, 0.0) == 0.0), None)
            factor = _constant_sign_and_scale(constant) if constant is not None else None
            if factor is not None:
                count *= factor[1] if node.op == "Mul" else 1.0 / factor[1]
        else:
            count = max(ins)
        for out in outs:
            counts[out.name] = count
    return counts


def make_masks_fp16_safe(model: onnx.ModelProto) -> tuple[onnx.ModelProto, MaskReport]:
    """Return ``model`` with its attention-mask constants FP16-safe, and what was rewritten.

    A model without such a mask is returned unchanged (the same object).
    """
    graph = import_graph(model)
    graph.toposort()
    outputs = {t.name for t in graph.outputs}
    data = _data_tensors(graph)
    # (node, input index, constant) for every use of a mask-like float constant.
    uses = [
        (node, i, tensor)
        for node in graph.nodes
        for i, tensor in enumerate(node.inputs)
        if isinstance(tensor, gs.Constant) and _is_float(tensor) and _huge_negative(np.asarray(constant_values(tensor)))
    ]
    accepted: list[tuple[gs.Node, int, gs.Constant, _Route]] = []
    for node, index, constant in uses:
        route = _Route()
        _follow(node, index, -1, 1.0, data, outputs, route, set())
        if route.ok and route.softmax:
            accepted.append((node, index, constant, route))
        else:
            logger.debug("not an attention mask: %s into %s: %s", constant.name, node.name, route.why_not or "no softmax")
    if not accepted:
        return model, MaskReport()

    tensors = set().union(*(route.tensors for *_, route in accepted))
    renamed = {constant.name: f"{constant.name}__fp16_safe" for _, _, constant, _ in accepted}
    # Masks summed into one softmax input add up: halve the value for each extra one, so the
    # sum (plus scores) still stays finite in FP16. Counted before the rewrite, on unit magnitudes.
    counts = _mask_counts(graph, tensors | set(renamed), {c.name: 1.0 for _, _, c, _ in accepted})
    softmax_inputs = [
        counts.get(n.inputs[0].name, 0.0) for n in graph.nodes if n.op in _SOFTMAX_OPS and n.inputs
    ]
    stacked = max([1.0, *softmax_inputs])
    value = MASK_VALUE / 2.0 ** math.ceil(math.log2(stacked))

    replacements: dict[str, gs.Constant] = {}
    found: dict[str, tuple[float, set[str]]] = {}  # constant -> (its mask value, softmax nodes reached)
    for node, index, constant, route in accepted:
        if constant.name not in replacements:
            values = np.asarray(constant_values(constant))
            huge = values <= -FP16_MAX
            replacements[constant.name] = new_constant(
                model, renamed[constant.name], np.where(huge, value, values).astype(values.dtype)
            )
            found[constant.name] = (float(values[huge].max()), set())  # normally one value: finfo.min, -inf
        node.inputs[index] = replacements[constant.name]
        found[constant.name][1].update(route.softmax)
    report = MaskReport([MaskRewrite(name, old, value, tuple(sorted(hit))) for name, (old, hit) in found.items()])
    report.offsets = {name: abs(value) * count for name, count in counts.items() if name in tensors and count > 0}
    for rewrite in report.rewrites:
        logger.info(
            "fp16: attention mask constant %r rewritten from %g to %g (reaches %d softmax node(s))",
            rewrite.constant, rewrite.old, rewrite.new, len(rewrite.softmax),
        )
    graph.cleanup()
    # Only constants changed, to ones of the same shape and type: the graph's inferred value_info
    # still holds, so no shape inference and checker run again (0.7 s a call on MiniLM, and a
    # compile makes this call several times).
    return carry_metadata(model, export_graph(graph, model)), report
