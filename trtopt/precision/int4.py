"""Weight-only low-bit precisions: INT4 (W4A16) and NVFP4 weights, written as TensorRT takes them.

Both store the weights of MatMul/Gemm layers in 4 bits and dequantize them in
front of the layer; activations stay in FP16 (the float part is the FP16 pass's
graph, with its FP32 keep-list). No activation is quantized, so RTN needs no
calibration data.

INT4 (TensorRT's "Quantization Schemes" and "Explicit Quantization" docs; NVIDIA
ModelOpt's ``rtn_dq`` writes the same graph):

- the weight ``[K, N]`` (MatMul; a Gemm's ``[N, K]`` when ``transB=1``) is an INT4
  initializer, its scale ``[K / B, N]`` is of the layer's float type (FP16), and
  ``DequantizeLinear(w, scale, axis=<the K axis>, block_size=B)`` feeds the layer,
  opset 21, no zero point, B 64 or 128;
- per block of B input channels ``s = max|w| / 7`` (floored at 1e-5, as ModelOpt)
  and ``q = round_half_even(w / s)`` clipped to [-8, 7], ``w / s`` computed in the
  weight's float type (as ModelOpt does, so the codes are the same);
- ``int4_method="awq"`` first moves a per-input-channel scale from the activation
  into the weight (AWQ, Lin et al. 2024): the weight of a salient channel (large
  mean |x|) is quantized more finely. The scale ``s = mean|x|^alpha`` (normalised)
  is searched per group of layers reading one activation, alpha on a grid,
  minimising the error of the quantized layer's output on calibration rows
  (only the rows at real tokens when the graph has a 0/1 padding-mask input:
  padding positions never reach a masked model's output);
  ``1/s`` goes into the LayerNormalization in front where it alone feeds the
  group, else into a Mul (the SmoothQuant pass's machinery, ``smoothquant.smooth``).

NVFP4 (TensorRT >= 10.8, compute capability >= 10.0; ModelOpt's NVFP4 exporter):

- the weight as ``[N, K]`` FLOAT4E2M1 codes, per block of 16 input channels an FP8
  E4M3 scale, itself dequantized by one FP32 scale per tensor:
  ``DequantizeLinear(sw_f8, sw_f32)`` -> ``DequantizeLinear(w_f4, ., axis=-1,
  block_size=16)`` -> (Transpose for MatMul) -> Cast to the float type, opset 23;
- ``sw_f32 = max|w| / (6 * 448)``, block scale ``amax_block / (6 * sw_f32)`` in
  FP8, codes ``w / (block scale * sw_f32)`` rounded to the nearest FP4 value.

A layer stays in float, with the reason in the report, when its weight is not a
2-D constant, the input channels K are not a multiple of the block, or the stored
weight's last dim is odd (two 4-bit codes share a byte along it). Embeddings
(Gather) are never quantized; the user's exclusions apply as for INT8.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ConfigError, GraphError
from ..executor.session import run_batches, stream_tensors
from ..graph import check_model
from ..names import excluded_by, inherit_metadata, node_modules
from .budget import BudgetReport, check_final
from .fp16 import KeptNode
from .int8 import Int8Plan
from .measured import to_fp16
from .readout import measure
from .report import PrecisionReport
from .smoothquant import smooth, smoothable_groups
from .validate import validate_qdq

if TYPE_CHECKING:
    from ..config import BuildConfig
    from .fp16 import Fp16Report
    from .pipeline import HeldOut, PreparedData
    from .readout import AccuracyReadout

logger = logging.getLogger(__name__)

INT4_QMIN, INT4_QMAX = -8, 7
INT4_SCALE_FLOOR = 1e-5  # ModelOpt's CLIP_MIN: an all-zero block keeps a positive scale
NVFP4_BLOCK = 16
FP4_MAX = 6.0  # largest FLOAT4E2M1 value
FP8_E4M3_MAX = 448.0
INT4_OPSET = 21  # DequantizeLinear with INT4 and block_size
NVFP4_OPSET = 23  # FLOAT4E2M1
WEIGHT_FORMATS = ("int4", "nvfp4")
# AWQ's grid of alpha (s = mean|x|^alpha) and how many activation rows it measures the error on.
AWQ_GRID = 20
AWQ_ROWS = 2048
FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class WeightUnit:
    """A MatMul/Gemm whose constant weight is stored in 4 bits; ``transposed``: the weight is ``[N, K]``."""

    node: str
    op: str
    weight: str
    transposed: bool
    module: str | None = None

    @property
    def k_axis(self) -> int:
        """The weight's input-channel axis: the axis the blocks run along."""
        return 1 if self.transposed else 0


@dataclass
class WeightOnlyReport:
    """What the weight-only pass stored in 4 bits, and what it left in float and why."""

    fmt: str
    block_size: int
    method: str
    units: list[dict[str, str]] = field(default_factory=list)
    skipped: list[KeptNode] = field(default_factory=list)
    dq_nodes: int = 0
    float_bytes: int = 0  # the quantized layers' weights as FP32
    quantized_bytes: int = 0  # the same weights as stored: codes and scales
    awq: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None  # e.g. why AWQ's scales were not kept

    def to_json(self) -> dict[str, Any]:
        return {
            "qdq_nodes": self.dq_nodes,
            "q_nodes": 0,
            "dq_nodes": self.dq_nodes,
            "quantized_activations": 0,
            "quantized_weights": len(self.units),
            "quantized_units": self.units,
            "not_quantized": [k.to_json() for k in self.skipped],
            "weight_only": {
                "format": self.fmt,
                "block_size": self.block_size,
                "method": self.method,
                "weight_bytes_fp32": self.float_bytes,
                "weight_bytes_stored": self.quantized_bytes,
                "weight_bytes_ratio": round(self.quantized_bytes / self.float_bytes, 4) if self.float_bytes else None,
                **({"awq": self.awq} if self.awq else {}),
                **({"note": self.note} if self.note else {}),
            },
        }


# ------------------------------------------------------------------ planning


def weight_units(
    model: onnx.ModelProto,
    *,
    block_size: int,
    exclude_nodes: Iterable[str] = (),
    exclude_op_types: Iterable[str] = (),
) -> tuple[list[WeightUnit], list[KeptNode]]:
    """The MatMul/Gemm layers whose weight goes to 4 bits, and the others with the reason they stay float."""
    modules = node_modules(model)
    initializers = {t.name: t for t in model.graph.initializer}
    exclude_nodes, exclude_op_types = tuple(exclude_nodes), set(exclude_op_types)
    units: list[WeightUnit] = []
    skipped: list[KeptNode] = []
    for node in model.graph.node:
        module = modules.get(node.name)
        if node.op_type == "Gather" and node.input and node.input[0] in initializers:
            skipped.append(KeptNode(node.name, node.op_type, "embedding (Gather): weight-only precisions "
                                    "quantize MatMul/Gemm weights only", module))
            continue
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        reason = f"op type {node.op_type} excluded by the user" if node.op_type in exclude_op_types else None
        reason = reason or excluded_by(node.name, module, exclude_nodes)
        attrs = {a.name: a.i for a in node.attribute}
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None:
            reason = reason or "weight is not a constant initializer (activation x activation products stay in float)"
            skipped.append(KeptNode(node.name, node.op_type, reason, module))
            continue
        if reason is None and node.input[0] in initializers:
            reason = "its data input is a constant"
        if reason is None and attrs.get("transA", 0):
            reason = "Gemm with transA=1"
        if reason is None and len(weight.dims) != 2:
            reason = f"weight has rank {len(weight.dims)}; weight-only quantization takes 2-D weights"
        if reason is None and weight.data_type not in FLOAT_TYPES:
            reason = f"weight is {onnx.TensorProto.DataType.Name(weight.data_type)}, not FP32/FP16"
        transposed = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
        if reason is None:
            k = weight.dims[1 if transposed else 0]
            if k % block_size:
                reason = f"its {k} input channels are not a multiple of the block size {block_size}"
            elif weight.dims[-1] % 2:
                reason = f"the weight's last dim ({weight.dims[-1]}) is odd: two 4-bit codes share a byte along it"
        if reason is not None:
            skipped.append(KeptNode(node.name, node.op_type, reason, module))
            continue
        units.append(WeightUnit(node.name, node.op_type, weight.name, transposed, module))
    return units, skipped


# ------------------------------------------------------------------ encoding


def rtn_int4(weight: np.ndarray, block_size: int, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """INT4 codes (int8 values in [-8, 7]) and scales for ``weight``, blocks along ``axis``.

    The scales have the weight's float type and shape, with ``axis`` divided by the
    block size. ``w / s`` is computed in that type, as ModelOpt's ``rtn`` does.
    """
    w = np.moveaxis(weight, axis, 0)
    k = w.shape[0]
    if k % block_size:
        raise GraphError(f"weight of shape {weight.shape}: {k} is not a multiple of block_size={block_size}")
    blocks = w.reshape(k // block_size, block_size, *w.shape[1:])
    amax = np.abs(blocks).max(axis=1).astype(np.float32)
    scale = np.maximum(amax / np.float32(INT4_QMAX), np.float32(INT4_SCALE_FLOOR)).astype(weight.dtype)
    codes = np.clip(np.rint(w / np.repeat(scale, block_size, axis=0)), INT4_QMIN, INT4_QMAX).astype(np.int8)
    return np.moveaxis(codes, 0, axis), np.moveaxis(scale, 0, axis)


def dequantize_int4(codes: np.ndarray, scale: np.ndarray, block_size: int, axis: int = 0) -> np.ndarray:
    """``codes * scale`` in float32, each scale repeated over its block (DequantizeLinear's arithmetic)."""
    return codes.astype(np.float32) * np.repeat(scale.astype(np.float32), block_size, axis=axis)


def nvfp4_encode(weight_nk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """NVFP4 codes (ml_dtypes float4_e2m1fn, ``[N, K]``), FP8 E4M3 block scales ``[N, K/16]`` and the
    per-tensor FP32 scale of a weight ``[N, K]`` (ModelOpt's NVFP4 formulas)."""
    w = np.asarray(weight_nk, dtype=np.float32)
    n, k = w.shape
    global_scale = np.float32(np.abs(w).max()) / np.float32(FP4_MAX * FP8_E4M3_MAX)
    if global_scale == 0:
        global_scale = np.float32(1.0)
    blocks = w.reshape(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    block_scale = np.abs(blocks).max(axis=-1) / (np.float32(FP4_MAX) * global_scale)
    block_scale[block_scale == 0] = 1.0
    block_fp8 = np.clip(block_scale, 0, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    effective = block_fp8.astype(np.float32) * global_scale
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(effective[..., None] > 0, blocks / effective[..., None], 0.0)
    codes = np.clip(scaled, -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn).reshape(n, k)
    return codes, block_fp8, np.float32(global_scale)


def nvfp4_decode(codes: np.ndarray, block_fp8: np.ndarray, global_scale: np.float32) -> np.ndarray:
    """The float32 ``[N, K]`` weight TensorRT computes from NVFP4 codes and their scales."""
    scale = block_fp8.astype(np.float32) * np.float32(global_scale)
    return codes.astype(np.float32) * np.repeat(scale, NVFP4_BLOCK, axis=-1)


# ------------------------------------------------------------------ graph rewriting


def quantize_weights(
    model: onnx.ModelProto, units: list[WeightUnit], *, fmt: str, block_size: int
) -> tuple[onnx.ModelProto, WeightOnlyReport]:
    """Store each unit's weight in ``fmt`` ("int4" or "nvfp4") behind DequantizeLinear; returns a new model.

    Works on the protobuf directly: onnx-graphsurgeon cannot write INT4 or FP4
    initializers. The scale takes the weight's float type (FP16 after the FP16 pass).
    """
    if fmt not in WEIGHT_FORMATS:
        raise GraphError(f"weight format {fmt!r} is not one of {WEIGHT_FORMATS}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    report = WeightOnlyReport(fmt, NVFP4_BLOCK if fmt == "nvfp4" else block_size, "rtn")
    added: dict[str, list[onnx.NodeProto]] = {}
    for unit in units:
        node = nodes[unit.node]
        source = initializers[unit.weight]
        weight = numpy_helper.to_array(source)
        if fmt == "int4":
            new_inits, chain, stored = _int4_chain(unit, weight, block_size)
        else:
            new_inits, chain, stored = _nvfp4_chain(unit, weight, source.data_type)
        output = chain[-1].output[0]
        report.quantized_bytes += stored
        report.dq_nodes += sum(n.op_type == "DequantizeLinear" for n in chain)
        report.float_bytes += weight.size * 4
        graph.initializer.extend(new_inits)
        for new in chain:
            inherit_metadata(new, node, "weight_only")
        node.input[1] = output
        added[unit.node] = chain
        record = {"node": unit.node, "op": unit.op}
        if unit.module is not None:
            record["module"] = unit.module
        report.units.append(record)
    # Each chain goes just before its layer (the graph stays sorted); weights nothing reads go.
    ordered = []
    for node in graph.node:
        ordered += added.get(node.name, [])
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    read = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _raise_opset(out, NVFP4_OPSET if fmt == "nvfp4" else INT4_OPSET)
    return out, report


def _int4_chain(
    unit: WeightUnit, weight: np.ndarray, block_size: int
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], int]:
    """INT4 codes and scale, the DequantizeLinear reading them, and the bytes they take."""
    base = f"{unit.node}/weight"
    codes, scale = rtn_int4(weight, block_size, unit.k_axis)
    inits = [
        numpy_helper.from_array(codes.astype(ml_dtypes.int4), f"{base}_int4"),
        numpy_helper.from_array(scale, f"{base}_scale"),
    ]
    dq = onnx.helper.make_node(
        "DequantizeLinear", [f"{base}_int4", f"{base}_scale"], [f"{base}_dequantized"],
        name=f"{unit.node}/weight_DequantizeLinear", axis=unit.k_axis, block_size=block_size,
    )
    return inits, [dq], (codes.size + 1) // 2 + scale.nbytes


def _nvfp4_chain(
    unit: WeightUnit, weight: np.ndarray, float_type: int
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], int]:
    """NVFP4 codes and scales, DQ -> DQ (-> Transpose) (-> Cast to ``float_type``), and the bytes they take."""
    base = f"{unit.node}/weight"
    codes, block_fp8, global_scale = nvfp4_encode(weight if unit.transposed else weight.T)
    inits = [
        numpy_helper.from_array(codes, f"{base}_fp4"),
        numpy_helper.from_array(block_fp8, f"{base}_block_scale_fp8"),
        numpy_helper.from_array(np.asarray(global_scale, np.float32), f"{base}_scale_fp32"),
    ]
    chain = [
        onnx.helper.make_node(
            "DequantizeLinear", [f"{base}_block_scale_fp8", f"{base}_scale_fp32"], [f"{base}_block_scale"],
            name=f"{unit.node}/weight_scale_DequantizeLinear",
        ),
        onnx.helper.make_node(
            "DequantizeLinear", [f"{base}_fp4", f"{base}_block_scale"], [f"{base}_dequantized"],
            name=f"{unit.node}/weight_DequantizeLinear", axis=-1, block_size=NVFP4_BLOCK,
        ),
    ]
    if not unit.transposed:  # MatMul and Gemm(transB=0) read [K, N]
        chain.append(onnx.helper.make_node(
            "Transpose", [chain[-1].output[0]], [f"{base}_transposed"], name=f"{unit.node}/weight_Transpose", perm=[1, 0]
        ))
    if float_type != onnx.TensorProto.FLOAT:  # the DQ computes FP32; the layer reads FP16
        chain.append(onnx.helper.make_node(
            "Cast", [chain[-1].output[0]], [f"{base}_cast"], name=f"{unit.node}/weight_Cast", to=float_type
        ))
    return inits, chain, (codes.size + 1) // 2 + block_fp8.size + 4


def _raise_opset(model: onnx.ModelProto, opset: int) -> None:
    """Declare at least ``opset`` for the default domain.

    Between opset 19 (trtopt's export) and 23 the operators trtopt's graphs use
    changed only by accepting more types (INT4, FP4, ...), so the version number
    is all that changes; ``check_weight_only_graph`` runs the ONNX checker after.
    """
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < opset:
            entry.version = opset
    model.ir_version = max(model.ir_version, 11 if opset >= 23 else 10)


def check_weight_only_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ONNX checker and strict shape inference on the rewritten graph (a GraphError names the problem)."""
    return check_model(model)


# ------------------------------------------------------------------ AWQ


class PaddingMask:
    """The current calibration batch's padding mask (``True`` at real tokens), as ``stream_tensors``
    feeds the mask input before the activations of the same batch."""

    def __init__(self) -> None:
        self.current: np.ndarray | None = None

    def update(self, values: np.ndarray) -> float:
        self.current = np.asarray(values) != 0
        return 0.0


class RowSampler:
    """Keeps up to ``rows`` rows (last axis = channels) of a tensor across batches, evenly spread:
    AWQ's search runs on them, in constant memory whatever the calibration set's size.

    With a ``mask``, a batch whose leading dims are the mask's ``[batch, seq]`` gives only its
    rows at real tokens: padding positions never reach a masked model's output, and in padded
    calibration batches they can be most of the rows. A batch the mask does not line up with
    gives all its rows, and ``masked`` turns False.
    """

    def __init__(self, rows: int = AWQ_ROWS, seed: int = 0, mask: PaddingMask | None = None) -> None:
        self.rows, self.seen = rows, 0
        self.kept: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)
        self.mask = mask
        self.masked = mask is not None

    def update(self, values: np.ndarray) -> float:
        flat = np.asarray(values, dtype=np.float32).reshape(-1, values.shape[-1])
        current = self.mask.current if self.mask is not None else None
        if current is not None and current.shape == values.shape[:-1]:
            flat = flat[current.reshape(-1)]
        else:
            self.masked = False
        self.seen += len(flat)
        take = min(len(flat), self.rows)
        self.kept.append(flat[self.rng.choice(len(flat), take, replace=False)])
        pool = np.concatenate(self.kept)
        if len(pool) > self.rows:
            pool = pool[self.rng.choice(len(pool), self.rows, replace=False)]
        self.kept = [pool]
        return float(np.abs(flat).max()) if flat.size else 0.0

    @property
    def values(self) -> np.ndarray:
        return self.kept[0] if self.kept else np.zeros((0, 0), np.float32)


def padding_mask_input(
    model: onnx.ModelProto, batches: Callable[[], Iterator[Mapping[str, np.ndarray]]]
) -> tuple[str | None, str]:
    """The graph input that is a padding mask, and how it was decided (or why there is none).

    A padding mask: a graph input whose name holds "mask", of rank 2 (``[batch, seq]``),
    whose values in every calibration batch are 0 or 1 with at least one 1 per sample.
    Exactly one input may qualify; zero or several (ambiguous) mean no mask. The name is
    required because other 0/1 ``[batch, seq]`` inputs exist (BERT's token_type_ids). A name
    holding "padding" is no such mask: torch's ``key_padding_mask`` marks padding with 1/True.
    """
    initializers = {t.name for t in model.graph.initializer}
    candidates = [
        vi.name for vi in model.graph.input
        if vi.name not in initializers and "mask" in vi.name.lower() and "padding" not in vi.name.lower()
        and len(vi.type.tensor_type.shape.dim) == 2
    ]
    if len(candidates) != 1:
        return None, ("no graph input named *mask* (1 at real tokens) of rank 2" if not candidates
                      else f"several mask-like inputs {candidates}: ambiguous")
    name = candidates[0]
    for feeds in batches():
        values = np.asarray(feeds.get(name)) if name in feeds else None
        if values is None or values.ndim != 2 or not np.isin(values, (0, 1)).all() or not values.any(axis=1).all():
            return None, f"input {name!r} is not a 0/1 [batch, seq] mask with a 1 in every sample"
    return name, f"rows at {name}=1 (padding positions left out)"


def awq_search(
    x: np.ndarray, weights: list[np.ndarray], block_size: int, grid: int = AWQ_GRID
) -> tuple[np.ndarray, float, float, float]:
    """AWQ's scale for input channels shared by ``weights`` (each ``[K, N]``) given rows ``x`` ``[R, K]``.

    ``s = mean|x|^alpha``, normalised so that ``sqrt(max(s) * min(s)) = 1``; alpha
    in ``[0, 1)`` on a grid of ``grid`` points (0 is plain RTN). Each candidate
    quantizes ``diag(s) W`` and measures ``|| (x / s) Q(diag(s) W) - x W ||^2``
    over the group, per row; the mean over rows is minimised among the candidates
    whose worst row is no worse than RTN's, so on these rows the chosen scale beats
    RTN on average without trading it for a worse outlier token. Returns (s, alpha,
    mean error at the best alpha, RTN's mean error).
    """
    x = x.astype(np.float32)
    x_mean = np.abs(x).mean(axis=0)
    references = [x @ w for w in weights]
    # Each row's error relative to its output's size: a few tokens with huge outputs (BERT's
    # [CLS]/[SEP]) would otherwise decide alpha for all the others.
    row_norms = [np.sum(ref**2, axis=1) + 1e-12 for ref in references]
    best: tuple[float, float, np.ndarray] | None = None
    rtn_error, rtn_worst = 0.0, 0.0
    for step in range(grid):
        alpha = step / grid
        s = np.maximum(x_mean, 1e-4) ** alpha
        s = s / np.sqrt(s.max() * s.min())
        rows = np.zeros(len(x), np.float64)
        for w, ref, norm in zip(weights, references, row_norms):
            codes, scale = rtn_int4((w * s[:, None]).astype(np.float32), block_size)
            rows += np.mean(((x / s) @ dequantize_int4(codes, scale, block_size) - ref) ** 2, axis=1) / norm
        error, worst = float(rows.mean()), float(rows.max())
        if step == 0:
            rtn_error, rtn_worst = error, worst
        elif worst > rtn_worst:
            continue
        if best is None or error < best[0]:
            best = (error, alpha, s)
    if best is None:  # step 0 (RTN) always qualifies: only an empty grid leaves nothing
        raise ValueError(f"awq_search needs grid >= 1 (got {grid})")
    error, alpha, s = best
    return s, alpha, error, rtn_error


def _all_rows_because(mask: PaddingMask | None, how: str) -> str:
    """What a record says when AWQ searched on all of an activation's rows."""
    return f"all rows: {how}" if mask is None else "all rows: the padding mask does not line up with this tensor"


def apply_awq(
    model: onnx.ModelProto,
    units: list[WeightUnit],
    batches: Callable[[], Iterator[Mapping[str, np.ndarray]]],
    block_size: int,
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Search AWQ scales for the MatMul/Gemm units on the calibration data and fold them into the graph.

    ``model`` is the FP32 graph. Units that read one activation share its scale;
    a weight shared with another node is left alone (rescaling it would change that
    node). Returns the rescaled graph (same function up to float rounding) and one
    record per activation: alpha, and the search's error against RTN's.
    """
    # (node, input, output-channel axis) as smoothable_groups reads an INT8 plan: [K, N] -> 1, [N, K] -> 0.
    plan = Int8Plan(weights=[(u.node, 1, 0 if u.transposed else 1) for u in units])
    groups = smoothable_groups(model, plan)
    if not groups:
        return model, []
    mask_name, how = padding_mask_input(model, batches)
    mask = PaddingMask() if mask_name is not None else None
    samplers = {name: RowSampler(mask=mask) for name in groups}
    logger.info("AWQ calibration rows: %s", how)
    observers: dict[str, PaddingMask | RowSampler] = dict(samplers)
    if mask_name is not None and mask is not None:
        observers = {mask_name: mask, **samplers}  # the mask first: it is fed before the batch's activations
    stream_tensors(model, list(observers), enumerate(dict(feeds) for feeds in batches()), observers)
    initializers = {t.name: t for t in model.graph.initializer}
    scales: dict[str, np.ndarray] = {}
    records: list[dict[str, Any]] = []
    for tensor, group in groups.items():
        sampler = samplers[tensor]
        rows = sampler.values
        if rows.size == 0:
            continue
        weights = [numpy_helper.to_array(initializers[u.weight]).astype(np.float32) for u in group]
        weights = [w if u.channel_axis == 0 else w.T for w, u in zip(weights, group)]  # all [K, N]
        s, alpha, error, rtn_error = awq_search(rows, weights, block_size)
        records.append({"tensor": tensor, "units": [u.node for u in group], "alpha": alpha,
                        "output_mse": error, "rtn_output_mse": rtn_error, "folded_into": None,
                        "rows": how if sampler.masked else _all_rows_because(mask, how)})
        if alpha > 0.0:  # at alpha 0 RTN is best: the layers stay as they are
            scales[tensor] = s
    if not scales:
        return model, records
    # smooth() computes s = channel_max^alpha / w_max^(1 - alpha); at alpha = 1 that is channel_max
    # itself, so passing the AWQ scales as channel_max applies exactly them (then folds 1/s).
    smoothed, _, report = smooth(model, {t: groups[t] for t in scales}, scales, 1.0)
    folded = {r.units: r.folded_into for r in report}
    for record in records:
        if record["tensor"] in scales:
            record["folded_into"] = folded.get(tuple(record["units"])) or "Mul"
    return smoothed, records


# ------------------------------------------------------------------ the precision step

WEIGHT_BOUND_HINT = (
    "INT4/NVFP4 weights suit weight-bound models (large MatMul/Gemm layers at small batch, as in "
    "decoders); for a small encoder try int4_method='awq', exclude_nodes=[...] for the layers named in "
    "the report, precision='int8', or precision='fp16'."
)


def weight_only_format(model: onnx.ModelProto) -> str | None:
    """'nvfp4' or 'int4' for a graph holding FLOAT4E2M1 or INT4 initializers, else None."""
    types = {t.data_type for t in model.graph.initializer}
    if onnx.TensorProto.FLOAT4E2M1 in types:
        return "nvfp4"
    if onnx.TensorProto.INT4 in types:
        return "int4"
    return None


def weight_only_path(
    model: onnx.ModelProto, config: BuildConfig, data: PreparedData
) -> tuple[onnx.ModelProto, PrecisionReport]:
    """``precision="int4"`` or ``"nvfp4"``: FP16 float part (keep-list), 4-bit MatMul/Gemm weights, readout.

    ``config`` is the BuildConfig, ``data`` the pipeline's PreparedData (calibration
    batches for AWQ and the FP16 keep-list, held-back batches for the readout).
    """
    fmt = config.precision.value
    block = NVFP4_BLOCK if fmt == "nvfp4" else config.int4_block_size
    method = config.int4_method if fmt == "int4" else "rtn"
    if config.int4_method == "awq" and fmt != "int4":
        raise ConfigError("int4_method='awq' applies to precision='int4'; NVFP4 weights are quantized by RTN")
    if method == "awq" and data.batches is None:
        raise ConfigError(
            "int4_method='awq' searches its scales on activations: pass calibration_data (a few hundred "
            "representative samples), or use int4_method='rtn', which needs none"
        )
    half, fp16_report, awq = _float_part(model, config, data, method, block)
    note = None
    held_out = data.held_out
    if awq and held_out is not None:
        # AWQ minimises each layer's error; the module is judged on its outputs. Keep its scales only
        # where the whole module is at least as good as with plain RTN on the held-back batches.
        plain, plain_report, _ = _float_part(model, config, data, "rtn", block)
        awq_readout, rtn_readout = (_readout_all_quantized(g, fmt, block, data, held_out) for g in (half, plain))
        if awq_readout.cosine < rtn_readout.cosine or awq_readout.min_cosine < rtn_readout.min_cosine:
            note = (f"AWQ's scales were dropped: on the held-back batches its module read cosine "
                    f"{awq_readout.cosine:.4f} (worst {awq_readout.min_cosine:.4f}), RTN's {rtn_readout.cosine:.4f} "
                    f"(worst {rtn_readout.min_cosine:.4f})")
            logger.warning("int4: %s; using RTN", note)
            half, fp16_report, method = plain, plain_report, "rtn"
    # On the FP16 graph: a weight the keep-list left FP32 is quantized with an FP32 scale.
    units, skipped = weight_units(half, block_size=block, **data.excluded)
    budget_report = None
    if data.budget is not None:
        budget_report = search_budget(half, units, fmt, block, data)
        kept = set(budget_report.kept_high)
        skipped += [KeptNode(u.node, u.op, "kept FP16 by the accuracy budget", u.module) for u in units if u.node in kept]
        units = [u for u in units if u.node not in kept]
    quantized, report_w = quantize_weights(half, units, fmt=fmt, block_size=block)
    quantized = check_weight_only_graph(quantized)
    report_w.method, report_w.awq, report_w.note = method, awq, note
    report_w.skipped = skipped
    validate_qdq(quantized)
    report = PrecisionReport(
        precision=fmt, float_precision="fp16", overflow_checked=data.batches is not None,
        **report_w.to_json(), **fp16_report.to_json(),
    )
    logger.info(
        "%s: %d MatMul/Gemm weights in 4 bits (%s, block %d), %d layers left in float; quantized weights "
        "%.1f MB -> %.1f MB", fmt, len(units), method, block, len(skipped),
        report_w.float_bytes / 1e6, report_w.quantized_bytes / 1e6,
    )
    if budget_report is not None:
        budget, held = data.budget_and_held_out()
        check_final(budget_report, quantized, held.reference, held.feeds, held.labels, budget,
                    value=budget_report.final, precision=fmt)
        report.accuracy_budget = budget_report
    if held_out is not None:
        report.accuracy = held_out.readout(quantized, fmt, lambda: [WEIGHT_BOUND_HINT])
    return quantized, report


def _float_part(
    model: onnx.ModelProto, config: BuildConfig, data: PreparedData, method: str, block: int
) -> tuple[onnx.ModelProto, Fp16Report, list[dict[str, Any]]]:
    """The FP16 graph the weights are quantized in (AWQ's scales folded in first when asked), its
    FP16 report, and AWQ's records."""
    awq: list[dict[str, Any]] = []
    if method == "awq":
        if data.batches is None:  # weight_only_path asks for calibration_data first
            raise RuntimeError("trtopt bug: AWQ ran without calibration batches; please report it")
        units, _ = weight_units(model, block_size=block, **data.excluded)
        model, awq = apply_awq(model, units, data.batches, block)
    half, fp16_report = to_fp16(model, data.batches, threshold=config.fp16_threshold, **data.excluded)
    return half, fp16_report, awq


def _readout_all_quantized(
    half: onnx.ModelProto, fmt: str, block: int, data: PreparedData, held: HeldOut
) -> AccuracyReadout:
    """The readout (against FP32, on the held-back batches) of ``half`` with every layer it can take in 4 bits."""
    units, _ = weight_units(half, block_size=block, **data.excluded)
    graph, _ = quantize_weights(half, units, fmt=fmt, block_size=block)
    return measure(graph, held.reference, held.feeds, held_back=held.held_back, classifiers=held.classifiers)


def search_budget(half: onnx.ModelProto, units: list[WeightUnit], fmt: str, block: int, data: PreparedData) -> BudgetReport:
    """The layers to keep in FP16 so that the module meets ``data.budget`` on the held-back batches.

    Greedy, as the INT8 search (``budget/search.py``) but without its switch graph: weight-only
    graphs need no calibration, so each candidate is simply written and run. Each layer's
    gain is the metric with it alone kept FP16; layers are kept, most helpful first, until
    the budget holds. Returns a ``BudgetReport`` (``all_int8`` holds every layer in 4 bits).
    """
    budget, held = data.budget_and_held_out()
    start = time.perf_counter()
    report = BudgetReport(budget=budget.describe())

    def measure(kept: frozenset[str]) -> float:
        graph, _ = quantize_weights(half, [u for u in units if u.node not in kept], fmt=fmt, block_size=block)
        report.evaluations += 1
        return budget.evaluate_batches(run_batches(graph, held.feeds), held.reference, held.labels)

    report.all_int8 = report.final = measure(frozenset())
    report.all_units_high = budget.evaluate_batches(run_batches(half, held.feeds), held.reference, held.labels)
    if not budget.met(report.all_int8):
        ranked = []
        for unit in units:
            value = measure(frozenset({unit.node}))
            ranked.append({"unit": unit.node, "op": unit.op, "module": unit.module, "kept_high": value,
                           "gain": budget.gain(value, report.all_int8)})
        report.units = sorted(ranked, key=lambda r: -r["gain"])
        kept: list[str] = []
        for entry in report.units:
            kept.append(entry["unit"])
            after = measure(frozenset(kept))
            report.steps.append({"phase": "keep", "unit": entry["unit"], "before": report.final, "after": after,
                                 "kept_high": list(kept)})
            report.final = after
            if budget.met(after):
                break
        report.kept_high = kept
    report.met = budget.met(report.final)
    report.seconds = round(time.perf_counter() - start, 3)
    logger.info("accuracy budget %s: %d of %d %s layers kept FP16 -> %.6g", budget.describe(),
                len(report.kept_high), len(units), fmt.upper(), report.final)
    return report
