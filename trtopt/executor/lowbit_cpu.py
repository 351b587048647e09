"""4-bit weights on ONNX Runtime's CPU provider: NVFP4 decoded here, INT4 left to ONNX Runtime.

ONNX Runtime (1.32) runs INT4 ``DequantizeLinear`` with ``block_size`` on the CPU:
the executor folds it into FP32 weights once (``session.disable_quant_qdq=1``,
TensorRT's dequantise-then-GEMM numbers), and a compiled module's backend may let
ONNX Runtime fuse it with the MatMul into ``MatMulNBits`` (``make_session``'s
``int4_accuracy_level``). It has no CPU kernel for FLOAT4E2M1, so an NVFP4
weight's two DequantizeLinear nodes are computed here, in numpy, into the FP32
weight TensorRT computes from them; the Transpose and Cast behind them stay.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

INT4_TYPES = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def has_int4_weights(model: onnx.ModelProto) -> bool:
    return any(t.data_type in INT4_TYPES for t in model.graph.initializer)


def has_fp4_weights(model: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.FLOAT4E2M1 for t in model.graph.initializer)


def _blocked_dequantize(codes: np.ndarray, scale: np.ndarray, axis: int, block: int) -> np.ndarray:
    """DequantizeLinear's arithmetic: each scale repeated over its block along ``axis``, in float32."""
    return codes.astype(np.float32) * np.repeat(scale.astype(np.float32), block, axis=axis)


def decode_fp4_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose FLOAT4E2M1 DequantizeLinear chains are FP32 initializers.

    The chain is ``DequantizeLinear(scale_fp8, scale_fp32)`` -> ``DequantizeLinear(w_fp4,
    that, axis, block_size)``; the second's output becomes an initializer of the same
    name. A model without FP4 initializers is returned as it is.
    """
    if not has_fp4_weights(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output}
    fp4 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT4E2M1}
    dropped: set[str] = set()
    decoded = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in fp4:
            continue
        scale_node = producers.get(node.input[1])
        if scale_node is None or scale_node.op_type != "DequantizeLinear":
            continue  # not the NVFP4 pattern: ONNX Runtime will say what it cannot run
        block_fp8 = numpy_helper.to_array(initializers[scale_node.input[0]])
        global_scale = numpy_helper.to_array(initializers[scale_node.input[1]]).astype(np.float32)
        scale = block_fp8.astype(np.float32) * global_scale  # the first DQ, in FP32
        codes = numpy_helper.to_array(initializers[node.input[0]])
        attrs = {a.name: a.i for a in node.attribute}
        axis = attrs.get("axis", 1) % codes.ndim
        weight = _blocked_dequantize(codes.astype(ml_dtypes.float4_e2m1fn), scale, axis, attrs["block_size"])
        decoded.append(numpy_helper.from_array(weight, node.output[0]))
        dropped |= {node.name, scale_node.name}
    kept = [n for n in graph.node if n.name not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(decoded)
    read = {name for n in graph.node for name in n.input}
    remaining = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    decoded_names = {t.name for t in decoded}
    kept_info = [vi for vi in graph.value_info if vi.name not in decoded_names]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return out
