"""Lay a Q/DQ graph out the way ONNX Runtime's CPU kernels run it fastest, with the same numbers.

A graph quantized for TensorRT (symmetric INT8, zero point 0, Q/DQ only on the
inputs of weighted ops) runs slowly under ONNX Runtime's CPU provider: its QDQ
fusions (DequantizeLinear -> Conv/MatMul/Gemm -> QuantizeLinear into
QLinearConv, QLinearMatMul, QGemm, MatMulIntegerToFloat) need

- every input of the op from a DequantizeLinear, a bias included (as int32 with
  scale ``input scale * weight scale``), and the op's only consumers QuantizeLinear
  nodes (a Relu in between only when the Q's zero point makes it redundant);
- on x86 without VNNI, unsigned activations: its int8 x int8 kernels are several
  times slower than uint8 x int8 ones. Those uint8 x int8 kernels add pairs of
  products in int16 with saturation (VPMADDUBSW), so codes above 127 times large
  weights come out wrong (ONNX Runtime's docs: "reduce_range"); a uint8 code
  that feeds an integer kernel must stay within 0..127.

Otherwise it dequantizes each weight again on every call and runs the float op.
``lower_qdq_for_cpu`` rewrites the graph so that these fusions apply, without
changing what it computes beyond float rounding:

- a symmetric int8 activation that is non-negative by construction (a Relu's
  output, a pooling of one) becomes uint8 with zero point 0 and its codes are
  clipped to 0..127: ``Q_u8(x) = Q_s8(x)`` for ``x >= 0``, and a Relu right
  before that Q is dropped (the Q clips at 0 itself);
- a signed activation read by no weighted op becomes uint8 with zero point 128
  (``Q_u8(x) = Q_s8(x) + 128`` exactly), so the op writing it can still be fused;
  a signed one read by a weighted op stays int8 and that op runs in float;
- a Conv/Gemm bias becomes int32 with scale ``s_x * s_w`` (rounding it moves an
  output by at most half of ``s_x * s_w``, far below the output's own step);
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

import numpy as np
import onnx
import onnx_graphsurgeon as gs

logger = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
_INT32_LIMIT = 2**31 - 1


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


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
        if any(_qdq_params(u) is None or _qdq_params(u)[1].dtype != np.int8 for u in users):
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
        zero = gs.Constant(f"{q.name}__zero_point_u8", np.full(_qdq_params(q)[1].shape, zero_value, np.uint8))
        q.inputs[2] = zero
        codes = q.outputs[0]
        codes.dtype = np.uint8
        for dq in users:
            dq.inputs[2] = zero
        if nonnegative:
            source = q.inputs[0]
            relu = source.inputs[0] if len(source.inputs) == 1 and source.inputs[0].op == "Relu" else None
            if relu is not None and len(source.outputs) == 1 and source.name not in outputs:
                q.inputs[0] = relu.inputs[0]  # Q_u8 with zero point 0 clips at 0 itself
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


def _activation_dq(node: gs.Node) -> gs.Node | None:
    """The DequantizeLinear feeding ``node``'s data input from uint8 codes, else None."""
    dq = _producer(node.inputs[0], "DequantizeLinear")
    if dq is None or _qdq_params(dq) is None or _constant(dq.inputs[0]) is not None:
        return None
    return dq if _qdq_params(dq)[1].dtype == np.uint8 else None


def _weight_dq(node: gs.Node) -> gs.Node | None:
    """The DequantizeLinear of a constant int8 weight feeding ``node``'s input 1, else None."""
    dq = _producer(node.inputs[1], "DequantizeLinear") if len(node.inputs) > 1 else None
    if dq is None or _qdq_params(dq) is None:
        return None
    weight = _constant(dq.inputs[0])
    return dq if weight is not None and weight.dtype == np.int8 else None


def _output_q(node: gs.Node, outputs: set[str]) -> gs.Node | None:
    """The uint8 QuantizeLinear that is the only reader of ``node``'s output, else None."""
    out = node.outputs[0]
    if out.name in outputs or len(out.outputs) != 1:
        return None
    user = out.outputs[0]
    if user.op != "QuantizeLinear" or _qdq_params(user) is None or _qdq_params(user)[1].dtype != np.uint8:
        return None
    return user


def _int32_bias(node: gs.Node, x_dq: gs.Node, w_dq: gs.Node, new_nodes: list[gs.Node]) -> bool:
    """Replace a constant float bias (Conv input 2, Gemm C) by int32 codes + DequantizeLinear.

    Returns False (and changes nothing) when the bias is not a constant vector or
    would not fit int32 at scale ``s_x * s_w``.
    """
    if len(node.inputs) < 3:
        return True
    bias_dq = _producer(node.inputs[2], "DequantizeLinear")
    if bias_dq is not None:  # already int32 codes (a graph laid out for the CPU before)
        return _constant(bias_dq.inputs[0]) is not None and _constant(bias_dq.inputs[0]).dtype == np.int32
    bias = _constant(node.inputs[2])
    if bias is None or bias.ndim != 1:
        return False
    if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
        return False
    s_x = _qdq_params(x_dq)[0].astype(np.float32)
    s_w = _qdq_params(w_dq)[0].astype(np.float32).reshape(-1)
    if s_w.size not in (1, bias.size):
        return False
    scale = (s_x * s_w).astype(np.float32)
    if scale.size == 1 and bias.size > 1:
        scale = np.full(bias.shape, scale.item(), np.float32)
    if not np.all(scale > 0):
        return False
    codes = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    if np.any(np.abs(codes) > _INT32_LIMIT):
        return False
    name = node.inputs[2].name
    dq_out = gs.Variable(f"{name}__dq_int32", np.float32, list(bias.shape))
    dq = gs.Node(
        "DequantizeLinear",
        f"{name}__DQ_int32",
        {"axis": 0},
        [gs.Constant(f"{name}__int32", codes.astype(np.int32)), gs.Constant(f"{name}__int32_scale", scale)],
        [dq_out],
    )
    node.inputs[2] = dq_out
    new_nodes.append(dq)
    return True


def _fold_weight(node: gs.Node, w_dq: gs.Node) -> None:
    """Dequantize a constant weight once, here (ONNX Runtime would redo it on every call)."""
    weight = _constant(w_dq.inputs[0]).astype(np.float32)
    scale, zero = _qdq_params(w_dq)
    scale, zero = scale.astype(np.float32), zero.astype(np.float32)
    if scale.size > 1:
        axis = int(w_dq.attrs.get("axis", 1)) % weight.ndim
        shape = [1] * weight.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    # (q - zero) * scale in float32, as DequantizeLinear computes it.
    node.inputs[1] = gs.Constant(f"{w_dq.outputs[0].name}__folded", ((weight - zero) * scale).astype(np.float32))


def _pool_codes(graph: gs.Graph, outputs: set[str]) -> int:
    """Move a MaxPool ahead of the uint8 Q/DQ in front of it (see the module docstring)."""
    moved = 0
    for pool in [n for n in graph.nodes if n.op in ("MaxPool", "GlobalMaxPool") and len(n.outputs) == 1]:
        dq = _producer(pool.inputs[0], "DequantizeLinear")
        if dq is None or _qdq_params(dq) is None or _qdq_params(dq)[0].size != 1:
            continue
        if _qdq_params(dq)[1].dtype != np.uint8 or len(dq.outputs[0].outputs) != 1:
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
    graph = gs.import_onnx(model)
    outputs = {t.name for t in graph.outputs}
    new_nodes: list[gs.Node] = []
    unsigned = _unsigned_activations(graph, outputs, new_nodes)
    graph.nodes.extend(new_nodes)
    new_nodes.clear()
    graph.cleanup()  # drops the Relus the uint8 Q made redundant, so ops see their Q directly
    pools = _pool_codes(graph, outputs)
    fused = folded = 0
    for node in [n for n in graph.nodes if n.op in WEIGHTED_OPS]:
        x_dq, w_dq = _activation_dq(node), _weight_dq(node)
        if w_dq is None:
            continue
        q = _output_q(node, outputs)
        integer = x_dq is not None and (q is not None or node.op in ("Gemm", "MatMul"))
        if integer and node.op in ("Conv", "Gemm") and not _int32_bias(node, x_dq, w_dq, new_nodes):
            integer = False
        if integer:
            fused += 1
        else:
            _fold_weight(node, w_dq)
            folded += 1
    graph.nodes.extend(new_nodes)
    graph.cleanup().toposort()
    lowered = gs.export_onnx(graph)
    lowered.ir_version = model.ir_version
    del lowered.opset_import[:]
    lowered.opset_import.extend(model.opset_import)
    logger.debug(
        "qdq for the CPU: %d activation pairs made uint8, %d weighted ops left to integer kernels, "
        "%d weights dequantized once, %d max pools on the codes",
        unsigned,
        fused,
        folded,
        pools,
    )
    return lowered
