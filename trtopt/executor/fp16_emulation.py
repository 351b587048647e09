"""FP16 emulation for ONNX Runtime's CPU provider: FP16 tensors rounded as TensorRT stores them.

The executor (``trtopt.executor.session.cpu_session``) applies this to every
graph it runs, so the CPU backend, the FP16 keep-list's overflow check, the
accuracy readout and the budget search all see the same FP16 values.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import read_weight, store_weight


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An FP32 graph that rounds every FP16 (and BF16) tensor of ``model`` as stored, for running on a CPU.

    ONNX Runtime's CPU provider has no FP16 kernel for most ops: it computes
    them in FP32 and drops the Casts between them, so an FP16 graph's
    intermediate overflow and rounding do not show there. TensorRT stores each
    FP16 tensor in FP16. This copy computes every op in FP32 but sends each
    FP16 tensor through an explicit Cast to FP16 and back, which ONNX Runtime
    keeps; the values it sees are the FP16 values TensorRT would see. BF16
    tensors (a ``model.bfloat16()``) are rounded to BF16 the same way. A graph
    without FP16 or BF16 tensors is returned as is.

    The graph's inputs and outputs keep their types: an FP16 input (a
    ``model.half()``) is widened by a Cast as it enters, an FP16 output narrowed
    as it leaves, so the session takes and returns what the model does. (A BF16
    input or output becomes FP32 here: numpy, hence ONNX Runtime's Python API,
    has no bfloat16; ``OnnxRuntimeBackend`` converts at the boundary, exactly.)

    Tensors that live inside TensorRT's fused INT8 kernels (``fused_int8_tensors``)
    are not rounded: TensorRT never stores them in FP16, and the Casts would keep
    ONNX Runtime from fusing DequantizeLinear -> Conv -> QuantizeLinear into its
    integer kernels. Nor is a tensor that an op which only moves or selects values
    (Reshape, Transpose, Gather, Relu, ...) makes from FP16 values: it holds FP16
    values already, so its Casts would change nothing and cost a copy each
    (``already_fp16``).
    """
    typed_half, half_tensors, to_round = _fp16_tensors(model)
    if not typed_half:
        return model
    return _in_fp32(model, to_round, half_tensors, keep_io=frozenset({onnx.TensorProto.FLOAT16}))


def widen_to_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` computing in FP32 where it computed in FP16 or BF16, its inputs and outputs unchanged.

    Exact for the weights (FP16 and BF16 values are FP32 values): what a
    ``model.half()`` is before trtopt writes INT8 or FP8 into it, as if the user had
    compiled the ``model.float()`` that it was made from, but still taking and
    returning FP16 (or BF16) tensors through Casts at the boundary.
    """
    if not _low_precision_types(model):
        return model
    return _in_fp32(model, set(), set(), keep_io=LOW_PRECISION)


def _in_fp32(
    model: onnx.ModelProto, to_round: set[str], half_tensors: set[str], keep_io: frozenset[int]
) -> onnx.ModelProto:
    """A copy of ``model`` computing in FP32: FP16/BF16 initializers, Casts and tensors made FP32,
    each tensor of ``to_round`` rounded by a Cast to its type and back; graph inputs and outputs of
    a type in ``keep_io`` keep it (a Cast as they enter or leave), the others become FP32."""
    types = _low_precision_types(model)
    taken = {name for node in model.graph.node for name in [*node.input, *node.output]}
    taken |= {vi.name for vi in [*model.graph.input, *model.graph.output]}

    def fresh(name: str) -> str:
        # a graph widened before (widen_to_fp32, then emulated) holds these names already
        candidate, n = name, 1
        while candidate in taken:
            candidate, n = f"{name}{n}", n + 1
        taken.add(candidate)
        return candidate

    fp32 = onnx.TensorProto.FLOAT
    emulated = onnx.ModelProto()
    emulated.CopyFrom(model)
    graph = emulated.graph
    for init in graph.initializer:
        if init.data_type in LOW_PRECISION:  # FP16 and BF16 values are exact in FP32
            values = read_weight(model, init).astype(np.float32)
            init.CopyFrom(store_weight(emulated, values, init.name))
    initializers = {init.name for init in graph.initializer}
    entry = []
    widened_inputs = {}
    for vi in graph.input:
        elem = vi.type.tensor_type.elem_type
        if vi.name in initializers or elem not in LOW_PRECISION:
            continue
        if elem in keep_io:
            widened_inputs[vi.name] = fresh(f"{vi.name}__fp32")
            entry.append(onnx.helper.make_node("Cast", [vi.name], [widened_inputs[vi.name]], to=fp32))
        else:
            vi.type.tensor_type.elem_type = fp32
    # A dequantized tensor read by an INT8 kernel and by other ops: the kernel reads it unrounded.
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"} & half_tensors
    wide_of = {name: fresh(f"{name}__fp32") for name in sorted(to_round)}  # each before its rounding
    nodes = entry
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = widened_inputs.get(name, name)
        if node.op_type in _INT8_KERNEL_OPS:
            for i in range(min(2, len(node.input))):
                if node.input[i] in dequantized and node.input[i] in wide_of:
                    node.input[i] = wide_of[node.input[i]]
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i in LOW_PRECISION:
                attr.i = fp32
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name in to_round:
                wide, rounded = wide_of[name], fresh(f"{name}__as_fp16")
                node.output[i] = wide
                nodes.append(onnx.helper.make_node("Cast", [wide], [rounded], to=types[name]))
                nodes.append(onnx.helper.make_node("Cast", [rounded], [name], to=fp32))
    # Outputs kept FP16/BF16 are narrowed as they leave (exact where the values were rounded already).
    narrowed = {
        vi.name: fresh(f"{vi.name}__emulated")
        for vi in graph.output
        if vi.type.tensor_type.elem_type in keep_io and vi.name not in widened_inputs
    }
    if narrowed:
        for node in nodes:
            for i, name in enumerate(node.input):
                node.input[i] = narrowed.get(name, name)
            for i, name in enumerate(node.output):
                node.output[i] = narrowed.get(name, name)
        nodes.extend(onnx.helper.make_node("Cast", [wide], [name], to=types[name]) for name, wide in narrowed.items())
    del graph.node[:]
    graph.node.extend(nodes)
    for vi in [*graph.value_info, *graph.output]:  # same names, now FP32 holding FP16 values
        if vi.type.tensor_type.elem_type in LOW_PRECISION and vi.name not in narrowed:
            vi.type.tensor_type.elem_type = fp32
    return emulated


# The float types below FP32 that the emulation rounds to (ONNX Runtime's CPU kernels lack them).
LOW_PRECISION = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})


def _low_precision_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every FP16/BF16 tensor of the graph (inputs, outputs, value_info, initializers) with its type."""
    graph = model.graph
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*graph.input, *graph.value_info, *graph.output]
        if vi.type.tensor_type.elem_type in LOW_PRECISION
    }
    types.update({t.name: t.data_type for t in graph.initializer if t.data_type in LOW_PRECISION})
    return types


def _fp16_tensors(model: onnx.ModelProto) -> tuple[set[str], set[str], set[str]]:
    """(the graph's FP16/BF16 tensors, those outside TensorRT's fused INT8 kernels, those ``emulate_fp16`` rounds)."""
    initializers = {t.name for t in model.graph.initializer}
    typed_half = set(_low_precision_types(model)) - initializers
    if not typed_half:
        return set(), set(), set()
    half_tensors = typed_half - fused_int8_tensors(model)
    inputs = {vi.name for vi in model.graph.input}  # they come in holding FP16/BF16 values
    return typed_half, half_tensors, half_tensors - already_fp16(model, half_tensors) - inputs


def check_against_engine(model: onnx.ModelProto, layer_information: dict) -> dict[str, list[str]]:
    """Where the emulation's FP16 rounding of ``model`` and a TensorRT engine built from it disagree.

    ``layer_information`` is the engine inspector's JSON (``TensorRTBackend.layer_information``;
    trtopt builds engines with detailed profiling verbosity, so each layer lists its output
    tensors with their data type). Returns two sorted lists of tensor names:

    - ``rounded_not_stored``: the emulation rounds them, but no engine layer writes them in
      FP16 (TensorRT fused them away, or keeps them in another precision): the emulation
      is stricter than the engine there, and slower than it needs to be;
    - ``stored_not_rounded``: an engine layer writes them in FP16, but the emulation
      neither rounds them nor knows them to hold FP16 values: the emulation is looser
      than the engine there.
    """
    _, half_tensors, rounded = _fp16_tensors(model)
    produced = {name for node in model.graph.node for name in node.output}
    stored = {
        output.get("Name")
        for layer in layer_information.get("Layers", []) if isinstance(layer, dict)
        for output in layer.get("Outputs", [])
        if any(word in str(output.get("Format/Datatype", "")).lower() for word in ("fp16", "half"))
    }
    return {
        "rounded_not_stored": sorted(rounded - stored),
        "stored_not_rounded": sorted((stored & produced) - half_tensors),
    }


# Ops whose output holds only values of their data inputs (moved, selected, or max'ed with 0),
# with how many leading inputs carry data (None: all): FP16 values in, FP16 values out.
_VALUE_PRESERVING = {
    "Reshape": 1, "Transpose": 1, "Squeeze": 1, "Unsqueeze": 1, "Flatten": 1, "Identity": 1,
    "Gather": 1, "Slice": 1, "Split": 1, "Expand": 1, "Tile": 1, "Concat": None,
    "DepthToSpace": 1, "SpaceToDepth": 1, "Relu": 1, "MaxPool": 1, "GlobalMaxPool": 1,
    "ReduceMax": 1, "ReduceMin": 1, "Max": None, "Min": None, "Neg": 1, "Abs": 1,
}


def already_fp16(model: onnx.ModelProto, half_tensors: set[str]) -> set[str]:
    """The tensors of ``half_tensors`` that an op in ``_VALUE_PRESERVING`` makes from FP16 values only.

    After emulation every tensor of ``half_tensors`` holds FP16 values (rounded, or made
    from FP16 values), as does every FP16 initializer, so one pass decides each node.
    """
    types = _low_precision_types(model)
    initializers = {init.name for init in model.graph.initializer}
    fp16_values = half_tensors | (initializers & set(types))
    found: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in _VALUE_PRESERVING or node.domain not in ("", "ai.onnx"):
            continue
        data = node.input[: _VALUE_PRESERVING[node.op_type]]
        if data and all(name in fp16_values for name in data):
            # FP16 values in, FP16 values out (BF16 likewise; a mix is rounded)
            found.update(
                name for name in node.output
                if name in half_tensors and all(types[d] == types[name] for d in data)
            )
    return found


# Ops between a tensor and its QuantizeLinear that TensorRT fuses with it (Relu into the
# producer's epilogue; pools between quantized layers run in INT8), so the tensor is never
# stored in FP16.
_FUSED_ACTIVATIONS = ("Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
_INT8_KERNEL_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def fused_int8_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors TensorRT keeps inside a fused INT8 kernel, so never stores in FP16.

    - re-quantized tensors: every consumer is a QuantizeLinear, directly or through
      a Relu (TensorRT fuses op + Relu + Q and writes INT8 codes), or through the
      Add that takes a weighted op's output and a dequantized residual (TensorRT
      fuses that Add into the weighted op's INT8 epilogue), or through a pooling
      op (TensorRT runs a pool between quantized layers in INT8);
    - dequantized inputs of weighted ops: a DequantizeLinear output read only as
      input 0 or 1 of Conv/ConvTranspose/Gemm/MatMul (TensorRT multiplies the INT8
      codes and applies the scales in the kernel's FP32 epilogue).

    Graph outputs are never in the set (their values are seen as they are).
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    producers = {name: node.op_type for node in model.graph.node for name in node.output}
    found: dict[str, bool] = {}

    def epilogue_add(name: str, user: onnx.NodeProto) -> bool:
        # Add(weighted op output, dequantized residual): both operands live in the epilogue.
        if user.op_type != "Add" or len(user.input) != 2:
            return False
        kinds = {producers.get(i) for i in user.input}
        return bool(kinds & set(_INT8_KERNEL_OPS)) and kinds <= {*_INT8_KERNEL_OPS, "DequantizeLinear"}

    def requantized(name: str) -> bool:
        if name not in found:
            found[name] = False  # guards the recursion; a valid graph has no cycles
            users = consumers.get(name, [])
            found[name] = (
                name not in outputs
                and bool(users)
                and all(
                    user.op_type == "QuantizeLinear"
                    and user.input[0] == name
                    or (user.op_type in _FUSED_ACTIVATIONS or epilogue_add(name, user))
                    and requantized(user.output[0])
                    for user in users
                )
            )
        return found[name]

    fused = {name for name in consumers if requantized(name)}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if users and all(
            user.op_type in _INT8_KERNEL_OPS and list(user.input).index(node.output[0]) in (0, 1)
            and list(user.input).count(node.output[0]) == 1
            for user in users
        ):
            fused.add(node.output[0])
    return fused
