"""Lay a Q/DQ graph out the way ONNX Runtime's CPU kernels run it fastest, with the same numbers.

A graph quantized for TensorRT (symmetric INT8, zero point 0, Q/DQ only on the
inputs of weighted ops) runs slowly under ONNX Runtime's CPU provider: it
dequantizes each weight again on every call and runs the float op. Its integer
kernels (QLinearConv, MatMulIntegerToFloat) are several times faster, but

- on x86 without VNNI, they want unsigned activations: int8 x int8 is several
  times slower than uint8 x int8;
- those uint8 x int8 kernels add pairs of products in int16 with saturation
  (VPMADDUBSW), so ``2 * code * |weight code|`` must stay within 32767: codes up to
  127 with 8-bit weights, or codes up to 255 with weights within +-63 (ONNX
  Runtime's docs: "reduce_range");
- ONNX Runtime's own Q/DQ fusions would also fuse where that bound fails, so
  trtopt turns them off (``make_session``) and writes the integer kernels here,
  only where they compute what the Q/DQ graph computes.

``lower_qdq_for_cpu`` rewrites the graph that way, without changing what it
computes beyond float rounding:

- a symmetric int8 activation that is non-negative by construction (a Relu's
  output, a pooling of one) becomes uint8 with zero point 0 and its codes are
  clipped to 0..127: ``Q_u8(x) = Q_s8(x)`` for ``x >= 0``;
- a Relu right before a uint8 Q with zero point 0 is dropped (the Q clips at 0
  itself), here and in graphs compiled with ``int8_layout="cpu"``, which are
  already uint8 with zero points and weights within +-63;
- a signed activation read by no weighted op becomes uint8 with zero point 128
  (``Q_u8(x) = Q_s8(x) + 128`` exactly), so the op writing it can still be fused;
  a signed one read by a weighted op stays int8 and that op runs in float;
- ``DQ(uint8) -> Conv -> Q(uint8)`` becomes QLinearConv, its bias int32 codes at
  scale ``s_x * s_w`` (rounding it moves an output by at most half of ``s_x * s_w``,
  far below the output's own step); ``DQ(uint8) -> MatMul/Gemm`` becomes
  MatMulIntegerToFloat (int32 sums, then the scales and the float bias). A Conv
  with a float output (a residual Add reads it) stays in float: ONNX Runtime's
  ConvInteger is several times slower than its float Conv;
- a weighted op left in float gets its weight dequantized once, here, instead
  of on every call;
- a max pool commutes with the monotonic Q and DQ, so it moves to where ONNX
  Runtime runs it fast: ``float op -> Q -> DQ -> MaxPool`` becomes
  ``float op -> MaxPool -> Q -> DQ`` (its NCHWc float pool, fused with the op),
  and after an integer kernel ``DQ -> MaxPool`` becomes ``MaxPool -> DQ`` (its
  NHWC uint8 pool). A plain float pool fed by a DQ is many times slower.

Graphs for TensorRT are never rewritten: this runs only where ONNX Runtime
executes a graph (``make_session``). FP8 graphs are not rewritten either: ONNX
Runtime has no FP8 integer kernels, and its CPU QuantizeLinear/DequantizeLinear
to and from FLOAT8E4M3FN (opset 19, saturating, ties to even) already compute
what TensorRT's FP8 Q/DQ compute, so they run as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import GraphError
from ..graph import constant_values, export_graph, import_graph, new_constant

logger = logging.getLogger(__name__)

# Makes the graph's new weights: ``trtopt.graph.new_constant`` for the model being lowered, so a
# model whose weights are on disk gets its folded and transposed weights on disk too.
Store = Callable[[str, np.ndarray], gs.Constant]

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
_INT32_LIMIT = 2**31 - 1


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    """A constant's values, read each time and not kept in the graph (its weights stay where they are)."""
    return np.asarray(constant_values(tensor)) if isinstance(tensor, gs.Constant) else None


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _qdq_params(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, zero point) of a Q/DQ node when both are constants, else None."""
    if len(node.inputs) < 3:
        return None
    scale, zero = _constant(node.inputs[1]), _constant(node.inputs[2])
    return None if scale is None or zero is None else (scale, zero)


def _zero_dtype(node: gs.Node) -> np.dtype | None:
    """The dtype of a Q/DQ node's zero point when its scale and zero point are constants, else None."""
    params = _qdq_params(node)
    return None if params is None else params[1].dtype


def _matched_qdq_params(node: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """``_qdq_params`` of a node a matcher above already accepted (so both are constants)."""
    params = _qdq_params(node)
    if params is None:
        raise GraphError(
            f"CPU integer lowering: {node.op} {node.name!r} was matched with a constant scale and zero point "
            "but has none; this is a trtopt bug, please report it (int8_layout='tensorrt' avoids this pass)"
        )
    return params


def _matched_weight(w_dq: gs.Node) -> np.ndarray:
    """The constant weight codes of a DequantizeLinear ``_weight_dq`` accepted."""
    weight = _constant(w_dq.inputs[0])
    if weight is None:
        raise GraphError(
            f"CPU integer lowering: {w_dq.name!r} was matched as a constant weight's DequantizeLinear but its "
            "input is not a constant; this is a trtopt bug, please report it (int8_layout='tensorrt' avoids this pass)"
        )
    return weight


# Ops whose output is non-negative when their (first) input is.
_KEEPS_SIGN = (
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax",
    "Cast", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
)


def _nonnegative(tensor: gs.Tensor) -> bool:
    """True when ``tensor`` cannot be negative by construction (a Relu, a pool of one, ...)."""
    for _ in range(64):  # follows a chain; bounded so a malformed graph cannot loop
        producer = tensor.inputs[0] if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 else None
        if producer is None:
            return False
        if producer.op in ("Relu", "Sigmoid", "HardSigmoid"):
            return True
        if producer.op == "Clip":  # ReLU6 and the like: a constant lower bound >= 0
            low = _constant(producer.inputs[1]) if len(producer.inputs) > 1 else None
            return low is not None and low.size == 1 and float(low) >= 0
        if producer.op in ("DequantizeLinear", "QuantizeLinear"):
            params = _qdq_params(producer)
            if params is None or np.any(params[1] != 0):
                return False
        elif producer.op == "Mul":  # by a non-negative constant, e.g. SmoothQuant's 1/s per channel
            factors = [_constant(t) for t in producer.inputs]
            variables = [t for t, f in zip(producer.inputs, factors) if f is None]
            if len(variables) != 1 or any(f is not None and np.any(f < 0) for f in factors):
                return False
            tensor = variables[0]
            continue
        elif producer.op not in _KEEPS_SIGN:
            return False
        tensor = producer.inputs[0]
    return False


def _feeds_weighted_op(dq_users: list[gs.Node]) -> bool:
    return any(c.op in WEIGHTED_OPS for dq in dq_users for c in dq.outputs[0].outputs)


def _activation_pairs(graph: gs.Graph, outputs: set[str]) -> list[tuple[gs.Node, list[gs.Node]]]:
    """Each symmetric int8 activation QuantizeLinear with the DequantizeLinear nodes reading it."""
    pairs = []
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        params = _qdq_params(q)
        if params is None or params[1].dtype != np.int8 or params[1].size != 1 or params[1].item() != 0:
            continue
        if _constant(q.inputs[0]) is not None or q.outputs[0].name in outputs:
            continue
        users = q.outputs[0].outputs
        if not users or any(u.op != "DequantizeLinear" or u.inputs[0] is not q.outputs[0] for u in users):
            continue
        if any(_zero_dtype(u) != np.int8 for u in users):
            continue
        pairs.append((q, list(users)))
    return pairs


def _unsigned_activations(graph: gs.Graph, outputs: set[str], new_nodes: list[gs.Node]) -> int:
    """Re-encode activation pairs as uint8 (see the module docstring); returns how many."""
    pairs = _activation_pairs(graph, outputs)
    # Decide on the untouched graph: re-encoding one pair must not change the verdict on the next.
    plans = [(q, users, _nonnegative(q.inputs[0]), _feeds_weighted_op(users)) for q, users in pairs]
    count = 0
    for q, users, nonnegative, feeds_kernel in plans:
        if not nonnegative and feeds_kernel:
            continue
        zero_value = 0 if nonnegative else 128
        zero = gs.Constant(f"{q.name}__zero_point_u8", np.full(_matched_qdq_params(q)[1].shape, zero_value, np.uint8))
        q.inputs[2] = zero
        codes = q.outputs[0]
        codes.dtype = np.uint8
        for dq in users:
            dq.inputs[2] = zero
        if nonnegative:
            # Symmetric int8 saturates at 127; and codes above 127 would saturate the integer kernels.
            clipped = gs.Variable(f"{codes.name}__to127", np.uint8, codes.shape)
            for dq in users:
                dq.inputs[0] = clipped
            new_nodes.append(
                gs.Node(
                    "Clip",
                    f"{q.name}__clip127",
                    inputs=[codes, gs.Constant(f"{q.name}__min0", np.array(0, np.uint8)),
                            gs.Constant(f"{q.name}__max127", np.array(127, np.uint8))],
                    outputs=[clipped],
                )
            )
        count += 1
    return count


def _drop_relus(graph: gs.Graph, outputs: set[str]) -> int:
    """``Relu -> Q(uint8, zero point 0)`` to ``Q``: that Q clips at 0 itself. Returns how many."""
    dropped = 0
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        params = _qdq_params(q)
        if params is None or params[1].dtype != np.uint8 or np.any(params[1] != 0):
            continue
        relu = _producer(q.inputs[0], "Relu")
        if relu is not None and len(q.inputs[0].outputs) == 1 and q.inputs[0].name not in outputs:
            q.inputs[0] = relu.inputs[0]
            dropped += 1
    return dropped


def _activation_dq(node: gs.Node) -> gs.Node | None:
    """The DequantizeLinear feeding ``node``'s data input from uint8 codes, else None."""
    dq = _producer(node.inputs[0], "DequantizeLinear")
    if dq is None or _constant(dq.inputs[0]) is not None:
        return None
    return dq if _zero_dtype(dq) == np.uint8 else None


def _weight_dq(node: gs.Node) -> gs.Node | None:
    """The DequantizeLinear of a constant int8 weight feeding ``node``'s input 1, else None."""
    dq = _producer(node.inputs[1], "DequantizeLinear") if len(node.inputs) > 1 else None
    if dq is None or _qdq_params(dq) is None:
        return None
    weight = dq.inputs[0]  # its type only: the codes are read where they are used
    return dq if isinstance(weight, gs.Constant) and weight.dtype == np.int8 else None


def _output_q(node: gs.Node, outputs: set[str]) -> gs.Node | None:
    """The uint8 QuantizeLinear that is the only reader of ``node``'s output, else None."""
    out = node.outputs[0]
    if out.name in outputs or len(out.outputs) != 1:
        return None
    user = out.outputs[0]
    if user.op != "QuantizeLinear" or _zero_dtype(user) != np.uint8:
        return None
    return user


def _bias_codes(node: gs.Node, scale: np.ndarray) -> np.ndarray | None:
    """A Conv's constant float bias as int32 codes at ``scale`` (``s_x * s_w`` per channel),
    or None when it is not a constant vector or does not fit int32. Rounding it moves an
    output by at most half of ``s_x * s_w``, far below the output's own quantization step."""
    bias = _constant(node.inputs[2])
    if bias is None or bias.ndim != 1 or bias.size != scale.size:
        return None
    codes = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    return None if np.any(np.abs(codes) > _INT32_LIMIT) else codes.astype(np.int32)


def _code_limit(x_dq: gs.Node) -> int:
    """The largest uint8 code that can reach ``x_dq``: 127 behind the Clip written above, else 255."""
    clip = _producer(x_dq.inputs[0], "Clip")
    high = _constant(clip.inputs[2]) if clip is not None and len(clip.inputs) > 2 else None
    return int(high) if high is not None and high.size == 1 and int(high) < 255 else 255


def _exact_in_int16_pairs(x_dq: gs.Node, w_dq: gs.Node) -> bool:
    """ONNX Runtime's u8 x s8 kernels on x86 without VNNI add pairs of products in int16 with
    saturation: exact only while ``2 * max code * max |weight code|`` fits."""
    weight = _matched_weight(w_dq).astype(np.int16)  # |-128| fits; half the transient of int32
    return 2 * _code_limit(x_dq) * int(np.abs(weight).max(initial=0)) <= np.iinfo(np.int16).max


def _channel_scales(w_dq: gs.Node, channels: int, axis: int) -> np.ndarray | None:
    """The weight scales as one per output channel (``axis`` of the weight), else None."""
    scale = _matched_qdq_params(w_dq)[0].astype(np.float32).reshape(-1)
    if scale.size == 1:
        return np.full(channels, scale.item(), np.float32)
    rank = len(w_dq.inputs[0].shape)  # a constant's shape: no need to read its values
    if scale.size != channels or int(w_dq.attrs.get("axis", 1)) % rank != axis:
        return None
    return scale


def _detach(node: gs.Node) -> gs.Variable:
    """Take ``node``'s output from it (cleanup then drops the node) and return it."""
    out = node.outputs[0]
    node.outputs.clear()
    return out


def _integer_conv(
    node: gs.Node, x_dq: gs.Node, w_dq: gs.Node, q: gs.Node | None, store: Store
) -> list[gs.Node] | None:
    """Conv from uint8 codes to the uint8 codes of the Q that reads it: QLinearConv.

    A Conv with a float output stays a float Conv (its weight dequantized once):
    ONNX Runtime's ConvInteger is several times slower than its float Conv.
    """
    weight = _matched_weight(w_dq)
    s_w = _channel_scales(w_dq, weight.shape[0], 0)
    if q is None or s_w is None:
        return None
    name = node.name
    scale = (_matched_qdq_params(x_dq)[0].astype(np.float32) * s_w).astype(np.float32)
    bias = _bias_codes(node, scale) if len(node.inputs) > 2 else np.zeros(scale.size, np.int32)
    if bias is None:
        return None
    y_scale, y_zero = q.inputs[1], q.inputs[2]
    codes = _detach(q)
    _detach(node)
    inputs = [
        x_dq.inputs[0], x_dq.inputs[1], x_dq.inputs[2],
        store(f"{name}__w_int8", weight), gs.Constant(f"{name}__w_scale", s_w),
        gs.Constant(f"{name}__w_zero", np.zeros(s_w.size, np.int8)),
        y_scale, y_zero, gs.Constant(f"{name}__bias_int32", bias),
    ]
    return [gs.Node("QLinearConv", name, dict(node.attrs), inputs, [codes])]


def _integer_matmul(node: gs.Node, x_dq: gs.Node, w_dq: gs.Node, store: Store) -> list[gs.Node] | None:
    """MatMul/Gemm on uint8 codes: MatMulIntegerToFloat (int32 sums, then scales and bias)."""
    weight = _matched_weight(w_dq)
    if weight.ndim != 2:
        return None
    trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0)) == 1
    if node.op == "Gemm" and (
        int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0
        or float(node.attrs.get("beta", 1.0)) != 1.0
    ):
        return None
    columns = weight.shape[0] if trans_b else weight.shape[1]
    s_w = _channel_scales(w_dq, columns, 0 if trans_b else 1)
    bias = _constant(node.inputs[2]) if len(node.inputs) > 2 else None
    if s_w is None or (len(node.inputs) > 2 and (bias is None or bias.size not in (1, columns))):
        return None
    name = node.name
    inputs = [
        x_dq.inputs[0], store(f"{name}__w_int8", np.ascontiguousarray(weight.T if trans_b else weight)),
        x_dq.inputs[1], gs.Constant(f"{name}__w_scale", s_w), x_dq.inputs[2],
        gs.Constant(f"{name}__w_zero", np.zeros(columns, np.int8)),
    ]
    if bias is not None:
        inputs.append(gs.Constant(f"{name}__bias", np.broadcast_to(bias.astype(np.float32).reshape(-1), (columns,)).copy()))
    out = _detach(node)
    return [gs.Node("MatMulIntegerToFloat", name, inputs=inputs, outputs=[out], domain="com.microsoft")]


def _integer_kernel(node: gs.Node, w_dq: gs.Node, outputs: set[str], store: Store) -> list[gs.Node] | None:
    """The integer-kernel nodes that replace ``node`` where they compute the same, else None."""
    x_dq = _activation_dq(node)
    if x_dq is None or _matched_qdq_params(x_dq)[0].size != 1 or not _exact_in_int16_pairs(x_dq, w_dq):
        return None
    if node.op == "Conv":
        return _integer_conv(node, x_dq, w_dq, _output_q(node, outputs), store)
    return _integer_matmul(node, x_dq, w_dq, store)


def _fold_weight(node: gs.Node, w_dq: gs.Node, store: Store) -> None:
    """Dequantize a constant weight once, here (ONNX Runtime would redo it on every call)."""
    weight = _matched_weight(w_dq).astype(np.float32)
    scale, zero = _matched_qdq_params(w_dq)
    scale, zero = scale.astype(np.float32), zero.astype(np.float32)
    if scale.size > 1:
        axis = int(w_dq.attrs.get("axis", 1)) % weight.ndim
        shape = [1] * weight.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    # (q - zero) * scale in float32, as DequantizeLinear computes it.
    node.inputs[1] = store(f"{w_dq.outputs[0].name}__folded", ((weight - zero) * scale).astype(np.float32))


def _pool_codes(graph: gs.Graph, outputs: set[str]) -> int:
    """Move a MaxPool ahead of the uint8 Q/DQ in front of it (see the module docstring)."""
    moved = 0
    for pool in [n for n in graph.nodes if n.op in ("MaxPool", "GlobalMaxPool") and len(n.outputs) == 1]:
        dq = _producer(pool.inputs[0], "DequantizeLinear")
        params = _qdq_params(dq) if dq is not None else None
        if dq is None or params is None or params[0].size != 1:
            continue
        if params[1].dtype != np.uint8 or len(dq.outputs[0].outputs) != 1:
            continue
        if dq.outputs[0].name in outputs:  # the dequantized tensor must stay as it is
            continue
        if _pool_before_q(pool, dq, outputs):
            moved += 1
            continue
        codes, result = dq.inputs[0], pool.outputs[0]
        pooled = gs.Variable(f"{result.name}__codes", np.uint8, result.shape)
        pool.inputs[0], pool.outputs[0] = codes, pooled
        dq.inputs[0], dq.outputs[0] = pooled, result
        moved += 1
    return moved


def _pool_before_q(pool: gs.Node, dq: gs.Node, outputs: set[str]) -> bool:
    """``float op -> Q -> [Clip] -> DQ -> pool`` to ``float op -> pool -> Q -> [Clip] -> DQ``
    when the op stays in float and nothing else reads the Q's input or codes."""
    chain = [dq]
    codes = dq.inputs[0]
    clip = _producer(codes, "Clip")
    if clip is not None:
        chain.append(clip)
        codes = clip.inputs[0]
    q = _producer(codes, "QuantizeLinear")
    if q is None or any(len(n.inputs[0].outputs) != 1 or n.inputs[0].name in outputs for n in [*chain, q]):
        return False
    source = q.inputs[0]
    producer = source.inputs[0] if len(source.inputs) == 1 else None
    if producer is None or source.name in outputs:
        return False
    if producer.op in WEIGHTED_OPS and _activation_dq(producer) is not None and _weight_dq(producer) is not None:
        return False  # an integer kernel: keep its Q right after it
    result = pool.outputs[0]
    pooled = gs.Variable(f"{result.name}__float", np.float32, result.shape)
    pool.inputs[0], pool.outputs[0] = source, pooled
    q.inputs[0] = pooled
    dq.outputs[0] = result
    return True


def is_cpu_layout(model: onnx.ModelProto) -> bool:
    """True for a graph compiled with ``int8_layout="cpu"``: its QuantizeLinear nodes write uint8
    (a graph for TensorRT is symmetric int8 until ``lower_qdq_for_cpu`` re-encodes it)."""
    uint8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8}
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in uint8 for n in model.graph.node)


def lower_qdq_for_cpu(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` laid out for ONNX Runtime's CPU QDQ fusions (see the module docstring).

    A graph without QuantizeLinear/DequantizeLinear, an FP8 one, or one with FP16
    initializers (not passed through ``emulate_fp16``), is returned as is.
    """
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return model
    if any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer):
        return model  # FP8 Q/DQ run faithfully as they are (see the module docstring)
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        # An FP16 graph as TensorRT gets it (emulate_fp16 turns it into FP32 for the CPU first);
        # the rewrite writes FP32 weights, so leave it as it is.
        return model
    graph = import_graph(model)
    store: Store = partial(new_constant, model)
    outputs = {t.name for t in graph.outputs}
    new_nodes: list[gs.Node] = []
    unsigned = _unsigned_activations(graph, outputs, new_nodes)
    graph.nodes.extend(new_nodes)
    new_nodes.clear()
    _drop_relus(graph, outputs)
    graph.cleanup()  # drops the Relus the uint8 Q made redundant, so ops see their Q directly
    pools = _pool_codes(graph, outputs)
    integer = folded = 0
    for node in [n for n in graph.nodes if n.op in WEIGHTED_OPS]:
        w_dq = _weight_dq(node)
        if w_dq is None:
            continue
        kernel = _integer_kernel(node, w_dq, outputs, store)
        if kernel:
            new_nodes.extend(kernel)
            integer += 1
        else:
            _fold_weight(node, w_dq, store)
            folded += 1
    graph.nodes.extend(new_nodes)
    graph.cleanup().toposort()
    lowered = export_graph(graph, model)
    lowered.ir_version = model.ir_version
    del lowered.opset_import[:]
    lowered.opset_import.extend(model.opset_import)
    if any(n.domain == "com.microsoft" for n in lowered.graph.node) and not any(
        o.domain == "com.microsoft" for o in lowered.opset_import
    ):
        lowered.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # MatMulIntegerToFloat
    logger.debug(
        "qdq for the CPU: %d activation pairs made uint8, %d weighted ops on integer kernels, "
        "%d weights dequantized once, %d max pools on the codes",
        unsigned,
        integer,
        folded,
        pools,
    )
    return lowered
