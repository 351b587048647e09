"""Check Q/DQ nodes against the TensorRT ONNX parser's rules before TensorRT sees them.

TensorRT rejects, or silently mis-builds, graphs whose quantization it does not
support: zero points must be zeros of INT8 or FLOAT8E4M3FN (FP8), scales
constant and positive, per-channel scales only on weights and along the
weight's output-channel axis, FP8 quantization saturating (TensorRT clips to
+-448) and the opset new enough for what is used (FP8 Q/DQ needs 19). Failing
here names the node; failing inside TensorRT names a layer it invented.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from ..errors import GraphError
from ..graph import constant_values, import_graph
from .int8 import weight_axis
from .qformat import FP8, format_of

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
PER_AXIS_OPSET = 13
FP16_SCALE_OPSET = 19
FP8_OPSET = 19  # QuantizeLinear/DequantizeLinear take FLOAT8E4M3FN from opset 19


def _constant_tensor(tensor: gs.Tensor | None) -> gs.Constant | None:
    """An initializer, or the value of the Constant node producing ``tensor``, else None."""
    if isinstance(tensor, gs.Constant):
        return tensor
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        return value if isinstance(value, gs.Constant) else None
    return None


def _constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, else None (read from disk, not
    kept in the graph, when the weights are on disk)."""
    constant = _constant_tensor(tensor)
    return None if constant is None else np.asarray(constant_values(constant))


def _is_weight(tensor: gs.Tensor) -> bool:
    """A constant, or a DequantizeLinear/QuantizeLinear of a constant (stored INT8 weights)."""
    if _constant_tensor(tensor) is not None:
        return True
    producer = tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None
    return producer is not None and producer.op in QDQ_OPS and _is_weight(producer.inputs[0])


def _weight_users(dq_output: gs.Tensor) -> list[tuple[gs.Node, int]]:
    """(consumer, input index) pairs reading ``dq_output``, looking through a DQ after a Q."""
    users = []
    for consumer in dq_output.outputs:
        if consumer.op == "DequantizeLinear" and consumer.inputs[0] is dq_output:
            users += _weight_users(consumer.outputs[0])
        else:
            users += [(consumer, i) for i, t in enumerate(consumer.inputs) if t is dq_output]
    return users


def validate_qdq(model: onnx.ModelProto) -> int:
    """Raise ``GraphError`` naming the first Q/DQ node TensorRT would refuse; return the Q/DQ count."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    # onnx-graphsurgeon warns on every FP8 tensor that numpy has no such type; it keeps them exact.
    with G_LOGGER.suppress(G_LOGGER.ERROR):
        return _validate(import_graph(model), opset)


def _validate(graph: gs.Graph, opset: int) -> int:
    count = 0
    for node in graph.nodes:
        if node.op not in QDQ_OPS:
            continue
        count += 1
        where = f"{node.op} node {node.name!r}"
        if len(node.inputs) < 2:
            raise GraphError(f"{where} has no scale input")
        if _low_bit_kind(node.inputs[0]) is not None or "block_size" in node.attrs:
            _check_blocked_dq(node, where, opset)  # INT4 / NVFP4 weights: their own rules
            continue
        data, scale_t = node.inputs[0], node.inputs[1]
        scale = _constant(scale_t)
        if scale is None:
            raise GraphError(
                f"{where}: scale {scale_t.name!r} is computed at run time; TensorRT needs a constant "
                "scale (an initializer)"
            )
        if scale.dtype not in (np.float32, np.float16):
            raise GraphError(f"{where}: scale has dtype {scale.dtype}; use float32 or float16")
        if scale.dtype == np.float16 and opset < FP16_SCALE_OPSET:
            raise GraphError(
                f"{where}: FP16 scales need opset {FP16_SCALE_OPSET} or newer but the model has opset "
                f"{opset}; export with opset={FP16_SCALE_OPSET}"
            )
        if scale.size == 0 or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            raise GraphError(
                f"{where}: scales must be finite and positive, got min {scale.min() if scale.size else 'none'}"
            )
        zero_point = node.inputs[2] if len(node.inputs) > 2 else None
        if zero_point is not None:
            zp = _constant(zero_point)
            if zp is None:
                raise GraphError(f"{where}: zero point {zero_point.name!r} must be a constant")
            fmt = format_of(zp.dtype)
            if zp.dtype == np.uint8:
                raise GraphError(
                    f"{where}: uint8 zero point: this graph is laid out for CPUs (int8_layout='cpu', "
                    "uint8 activations with zero points), which TensorRT cannot build; TensorRT needs "
                    "symmetric INT8: compile with int8_layout='tensorrt' (the default)"
                )
            if fmt is None:
                raise GraphError(
                    f"{where}: zero point has dtype {zp.dtype}; TensorRT quantizes to signed INT8 or "
                    "FP8 (FLOAT8E4M3FN), symmetrically: use an int8 or float8e4m3fn zero point of 0"
                )
            if fmt is FP8:
                _check_fp8(node, where, opset)
            if np.any(zp.astype(np.float32) != 0):
                raise GraphError(
                    f"{where}: zero point is {zp.ravel()[:4].tolist()}; TensorRT supports only "
                    "symmetric quantization (zero point 0)"
                )
            if zp.shape != scale.shape:
                raise GraphError(f"{where}: zero point shape {zp.shape} differs from scale shape {scale.shape}")
        elif node.op == "QuantizeLinear":
            raise GraphError(
                f"{where} has no zero point, so it produces uint8; add an int8 zero point of 0"
            )
        elif data.dtype is not None and format_of(data.dtype) is None:
            raise GraphError(f"{where} dequantizes {data.dtype}; TensorRT needs int8 or float8e4m3fn")
        elif format_of(data.dtype) is FP8:
            _check_fp8(node, where, opset)
        if scale.size == 1:
            continue  # per-tensor
        _check_per_channel(node, where, scale, opset)
    return count


def _check_fp8(node: gs.Node, where: str, opset: int) -> None:
    """FP8 Q/DQ: opset 19 or newer, and a QuantizeLinear that saturates as TensorRT's does."""
    if opset < FP8_OPSET:
        raise GraphError(
            f"{where}: FP8 (FLOAT8E4M3FN) Q/DQ needs opset {FP8_OPSET} or newer but the model has opset "
            f"{opset}; export with opset={FP8_OPSET}"
        )
    if node.op == "QuantizeLinear" and int(node.attrs.get("saturate", 1)) != 1:
        raise GraphError(
            f"{where}: saturate=0, but TensorRT's FP8 quantization clips to +-448 (saturate=1, the "
            "default); remove the attribute"
        )


def _check_per_channel(node: gs.Node, where: str, scale: np.ndarray, opset: int) -> None:
    if opset < PER_AXIS_OPSET:
        raise GraphError(f"{where}: per-channel scales need opset {PER_AXIS_OPSET} or newer (model has {opset})")
    if scale.ndim != 1:
        raise GraphError(f"{where}: per-channel scales must be 1-D, got shape {scale.shape}")
    data = node.inputs[0]
    if not _is_weight(data):
        raise GraphError(
            f"{where}: per-channel scales on activation {data.name!r}; TensorRT allows them only on "
            "constant weights, so quantize activations per-tensor (one scale)"
        )
    constant = _constant_tensor(data)  # its shape only: the codes need not be read
    shape = tuple(constant.shape) if constant is not None else None
    rank = len(shape) if shape is not None else len(data.shape or ())
    axis = int(node.attrs.get("axis", 1))
    axis = axis + rank if axis < 0 else axis
    output = node.outputs[0]
    for consumer, index in _weight_users(output):
        expected = weight_axis(consumer) if index == 1 else None
        if expected is None:
            raise GraphError(
                f"{where}: per-channel weight feeds input {index} of {consumer.op} node "
                f"{consumer.name!r}, where TensorRT expects no per-channel scale"
            )
        if axis != expected:
            raise GraphError(
                f"{where}: per-channel axis {axis} but {consumer.op} node {consumer.name!r} needs the "
                f"output-channel axis {expected} of its weight"
            )
    if shape is not None and shape[axis] != scale.size:
        raise GraphError(f"{where}: {scale.size} scales for axis {axis} of a weight of shape {shape}")


# ------------------------------------------------------------------ INT4 and NVFP4 weights

INT4_OPSET = 21  # DequantizeLinear of INT4 with block_size
FP4_OPSET = 23  # FLOAT4E2M1
INT4_BLOCK_SIZES = (64, 128)  # TensorRT's INT4 weight-only GEMMs
FP4_BLOCK_SIZE = 16


def _low_bit_kind(tensor: gs.Tensor) -> str | None:
    """'int4' or 'fp4' for a tensor of INT4 / FLOAT4E2M1 codes (numpy dtype from ml_dtypes, or ONNX's number)."""
    dtype = tensor.dtype
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        kinds: dict[int, str] = {onnx.TensorProto.INT4: "int4", onnx.TensorProto.FLOAT4E2M1: "fp4"}
        return kinds.get(int(dtype))
    name = str(np.dtype(dtype)) if dtype is not None else ""
    return {"int4": "int4", "float4_e2m1fn": "fp4"}.get(name)


def _check_blocked_dq(node: gs.Node, where: str, opset: int) -> None:
    """Block-quantized weights as TensorRT takes them (INT4 W4A16; NVFP4 with FP8 block scales)."""
    data, scale_t = node.inputs[0], node.inputs[1]
    kind = _low_bit_kind(data)
    if node.op != "DequantizeLinear" or kind is None:
        raise GraphError(
            f"{where}: blocked quantization (block_size) that TensorRT does not take; it dequantizes "
            "INT4 or FLOAT4E2M1 weights only (weight-only precisions 'int4' and 'nvfp4')"
        )
    needed = INT4_OPSET if kind == "int4" else FP4_OPSET
    if opset < needed:
        raise GraphError(
            f"{where}: {kind.upper()} DequantizeLinear needs opset {needed} or newer but the model has opset "
            f"{opset}; export with opset={needed}"
        )
    weight = _constant(data)
    if weight is None:
        raise GraphError(f"{where}: {kind.upper()} data {data.name!r} must be a constant weight")
    block = int(node.attrs.get("block_size", 0))
    allowed = INT4_BLOCK_SIZES if kind == "int4" else (FP4_BLOCK_SIZE,)
    if block not in allowed:
        raise GraphError(
            f"{where}: block_size={block}; TensorRT takes {kind.upper()} weights in blocks of "
            f"{' or '.join(map(str, allowed))}: use int4_block_size=64 or 128"
        )
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        zp = _constant(node.inputs[2])
        if zp is None or np.any(zp.astype(np.float32) != 0):
            raise GraphError(
                f"{where}: zero point {node.inputs[2].name!r} is not 0; TensorRT takes symmetric "
                f"{kind.upper()} weights only: drop the zero point"
            )
    if kind == "fp4":
        producer = scale_t.inputs[0] if isinstance(scale_t, gs.Variable) and scale_t.inputs else None
        if producer is None or producer.op != "DequantizeLinear" or _constant(producer.inputs[0]) is None:
            raise GraphError(
                f"{where}: NVFP4 block scales must be FP8 E4M3 constants dequantized by a per-tensor FP32 "
                "scale (DequantizeLinear(scale_fp8, scale_fp32) in front)"
            )
        scale_shape = producer.inputs[0].shape
    else:
        scale = _constant(scale_t)
        if scale is None:
            raise GraphError(f"{where}: scale {scale_t.name!r} must be a constant")
        if scale.dtype not in (np.float16, np.float32):
            raise GraphError(f"{where}: INT4 scale has dtype {scale.dtype}; use the activations' float type (FP16)")
        if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            raise GraphError(f"{where}: scales must be finite and positive")
        scale_shape = scale.shape
    if len(scale_shape) != weight.ndim:
        raise GraphError(
            f"{where}: scale of rank {len(scale_shape)} for a weight of rank {weight.ndim}; TensorRT needs the "
            "scale to have the weight's rank"
        )
    axis = int(node.attrs.get("axis", 1)) % weight.ndim
    if weight.ndim < 2 or axis < weight.ndim - 2:
        raise GraphError(f"{where}: blocks along axis {axis}; TensorRT blocks along one of the last two dims")
    expected = tuple(d // block if i == axis else d for i, d in enumerate(weight.shape))
    if tuple(scale_shape) != expected or weight.shape[axis] % block:
        raise GraphError(
            f"{where}: scale shape {tuple(scale_shape)} does not match a weight of shape {weight.shape} in "
            f"blocks of {block} along axis {axis} (expected {expected})"
        )
    users = _through(node.outputs[0], ("Transpose", "Cast"))
    if not users or any(user.op not in ("MatMul", "Gemm") or index != 1 for user, index in users):
        raise GraphError(
            f"{where}: {kind.upper()} weights must feed input 1 of MatMul/Gemm (TensorRT's weight-only GEMMs), "
            f"not {sorted({f'{u.op} input {i}' for u, i in users})}"
        )


def _through(tensor: gs.Tensor, passes: tuple[str, ...]) -> list[tuple[gs.Node, int]]:
    """(consumer, input index) pairs reading ``tensor``, looking through the ops in ``passes``."""
    users = []
    for consumer in tensor.outputs:
        if consumer.op in passes:
            users += _through(consumer.outputs[0], passes)
        else:
            users += [(consumer, i) for i, t in enumerate(consumer.inputs) if t is tensor]
    return users
