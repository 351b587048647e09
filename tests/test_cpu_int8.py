"""TensorRT-faithful INT8 on the CPU backend: integer kernels, same numbers.

The graph TensorRT gets is unchanged (symmetric INT8, FP16 float part); what
ONNX Runtime runs is ``lower_qdq_for_cpu(emulate_fp16(graph))``. These tests pin
that (1) the FP16 emulation leaves out the tensors TensorRT keeps inside fused
INT8 kernels, (2) ONNX Runtime then fuses Conv into QLinearConv, (3) the rewrite
itself is exact (only the integer kernels' rounding differs), and (4) on the
trained digits models the fast path stays within the INT8 tolerance of the
plain emulation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import trtopt
from trtopt.bench.digits import DigitsTransformer, top1
from trtopt.executor.session import DISABLED_OPTIMIZERS, make_session
from trtopt.executor.qdq_cpu import is_cpu_layout, lower_qdq_for_cpu
from trtopt.precision import emulate_fp16, validate_qdq
from trtopt.executor.fp16_emulation import fused_int8_tensors

INT8_TOLERANCE = 1.0  # top-1 points, as in test_precision_digits


def plain_session(
    model: onnx.ModelProto, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
) -> ort.InferenceSession:
    """The reference: the emulated graph as it is, Q/DQ run as float ops (no QDQ fusions, which
    on an x86 CPU without VNNI would saturate int8 x int8 products in the transformer)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    """The op types ONNX Runtime actually runs for ``model`` in trtopt's session, after its own rewrites."""
    path = tmp_path / "optimized.onnx"
    make_session(model, optimized_model_path=str(path))
    return [n.op_type for n in onnx.load(path).graph.node]


@pytest.fixture(scope="module")
def cnn_int8(digits, digits_cnn):
    model = digits_cnn
    module = trtopt.compile(
        model, (digits.test_x[:4],), precision="int8", calibration_data=digits.calibration_batches(),
        dynamic_shapes={"x": {0: (1, 64, 512)}}, backend="onnxruntime",
    )
    return model, module


def test_the_tensorrt_graph_is_unchanged(cnn_int8):
    _, module = cnn_int8
    graph = module.onnx_model
    assert validate_qdq(graph) > 0  # symmetric int8, zero point 0: TensorRT's rules
    zero_points = [i for i in graph.graph.initializer if i.name.endswith("__zero_point")]
    assert zero_points and {i.data_type for i in zero_points} == {onnx.TensorProto.INT8}
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)


def test_fp16_emulation_skips_tensors_inside_fused_int8_kernels(cnn_int8):
    _, module = cnn_int8
    graph = module.onnx_model
    fused = fused_int8_tensors(graph)
    # Every Relu output that only feeds a Q, and every dequantized Conv/Gemm input, is fused.
    relu_into_q = [n.output[0] for n in graph.graph.node if n.op_type == "Relu"
                   and all(c.op_type == "QuantizeLinear" for c in graph.graph.node if n.output[0] in c.input)]
    assert relu_into_q and set(relu_into_q) <= fused
    emulated = emulate_fp16(graph)
    rounded = {n.output[0] for n in emulated.graph.node if n.op_type == "Cast" and n.input[0].endswith("__as_fp16")}
    assert rounded  # tensors TensorRT does store in FP16 are still rounded
    assert not fused & rounded
    # Conv/Gemm read their dequantized inputs unrounded, also where an Add reads the same tensor rounded.
    emulated_producers = {o: n for n in emulated.graph.node for o in n.output}
    for node in emulated.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert not {node.input[0], node.input[1]} & rounded, node.name
            assert emulated_producers[node.input[1]].op_type == "DequantizeLinear"
    assert any(t.endswith("__fp32") and emulated_producers[t].op_type == "DequantizeLinear"
               for n in emulated.graph.node if n.op_type == "Conv" for t in n.input[:1])


def test_onnxruntime_runs_the_convolutions_as_integer_kernels(cnn_int8, tmp_path):
    _, module = cnn_int8
    emulated = emulate_fp16(module.onnx_model)
    ops = optimized_ops(emulated, tmp_path)
    # The block's first conv (Conv -> Relu -> Q) and the head (Gemm on a non-negative mean) run
    # as integer kernels. The others have a float output in the TensorRT graph (the residual Add,
    # the mean) or a signed input (the image), and run in float with their weight dequantized once.
    assert ops.count("QLinearConv") == 1 and ops.count("MatMulIntegerToFloat") == 1, ops
    assert "Gemm" not in ops and "MatMul" not in ops, ops
    # ONNX Runtime's own Q/DQ fusions are off in trtopt's sessions: without the CPU layout
    # nothing would run on integer kernels.
    plain = tmp_path / "plain.onnx"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.optimized_model_filepath = str(plain)
    ort.InferenceSession(emulated.SerializeToString(), options, providers=["CPUExecutionProvider"])
    plain_ops = [n.op_type for n in onnx.load(plain).graph.node]
    assert not {"QLinearConv", "MatMulIntegerToFloat", "QGemm"} & set(plain_ops), plain_ops


def test_the_rewrite_itself_is_exact(cnn_int8, digits):
    """With ONNX Runtime's fusions off, the CPU layout computes what the emulated graph computes."""
    _, module = cnn_int8
    emulated = emulate_fp16(module.onnx_model)
    x = digits.test_x[:64].numpy()
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = plain_session(emulated, off).run(None, {"x": x})[0]
    got = plain_session(lower_qdq_for_cpu(emulated), off).run(None, {"x": x})[0]
    # Only the int32 bias rounding (half of s_x * s_w at most) moves values, and rarely tips a
    # later quantization step: no logit moves by more than 1% of the range, no class changes.
    assert np.abs(got - want).max() <= 0.01 * np.abs(want).max()
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_fast_path_stays_within_int8_tolerance_on_digits(cnn_int8, digits):
    model, module = cnn_int8
    x = digits.test_x.numpy()
    fast = module(x)
    reference = plain_session(emulate_fp16(module.onnx_model)).run(None, {"x": x})[0]
    assert abs(top1(fast, digits.test_y) - top1(reference, digits.test_y)) <= INT8_TOLERANCE
    assert float(np.mean(fast.argmax(1) == reference.argmax(1))) >= 0.99
    with torch.no_grad():
        fp32 = top1(model(digits.test_x), digits.test_y)
    assert fp32 - top1(fast, digits.test_y) <= INT8_TOLERANCE


def test_transformer_fast_path_stays_within_int8_tolerance(digits, trained_digits):
    model = trained_digits.get(DigitsTransformer, rows=True, epochs=8)
    x = digits.test_x[:, 0]
    module = trtopt.compile(
        model, (x[:4],), precision="int8", calibration_data=digits.calibration_batches(rows=True),
        dynamic_shapes={"x": {0: (1, 64, 512)}}, backend="onnxruntime",
    )
    fast = module(x.numpy())
    reference = plain_session(emulate_fp16(module.onnx_model)).run(None, {"x": x.numpy()})[0]
    assert abs(top1(fast, digits.test_y) - top1(reference, digits.test_y)) <= INT8_TOLERANCE


def test_a_graph_without_qdq_or_still_in_fp16_is_left_alone(cnn_int8):
    _, module = cnn_int8
    assert lower_qdq_for_cpu(module.onnx_model) is module.onnx_model  # FP16 initializers: not emulated
    plain = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    assert lower_qdq_for_cpu(plain) is plain
    make_session(plain)  # and a session still builds


def _uint8_conv_graph(weight_codes: np.ndarray) -> onnx.ModelProto:
    """x -> Q_u8 -> DQ -> Conv(DQ(int8 weight)) -> Q_u8 -> DQ, codes 0..255 (no Clip to 127)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv"),
        helper.make_node("QuantizeLinear", ["y", "ys", "z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "z"], ["out"]),
    ]
    inits = [const("s", np.float32(0.01)), const("z", np.uint8(0)), const("w", weight_codes),
             const("ws", np.full(2, 0.01, np.float32)), const("wz", np.zeros(2, np.int8)),
             const("ys", np.float32(0.05))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@pytest.mark.parametrize("largest_weight, integer", [(63, True), (127, False)])
def test_integer_kernels_only_where_int16_pair_sums_cannot_saturate(largest_weight, integer):
    # Codes up to 255 times weights up to 127 overflow the u8 x s8 kernels' int16 pair sums on
    # x86 CPUs without VNNI; up to 63 they cannot (2 * 255 * 63 < 32767).
    weight = np.full((2, 2, 1, 1), largest_weight, np.int8)
    model = _uint8_conv_graph(weight)
    lowered = lower_qdq_for_cpu(model)
    assert ("QLinearConv" in [n.op_type for n in lowered.graph.node]) is integer
    x = np.random.default_rng(0).uniform(0, 2.55, (1, 2, 4, 4)).astype(np.float32)
    want = plain_session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    got = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=0.05 + 1e-6)  # at most one output step apart


@pytest.fixture(scope="module")
def cnn_cpu_layout(cnn_int8, digits):
    model, _ = cnn_int8
    return trtopt.compile(
        model, (digits.test_x[:4],), precision="int8", int8_layout="cpu",
        calibration_data=digits.calibration_batches(), dynamic_shapes={"x": {0: (1, 64, 512)}},
    )


def test_cpu_layout_is_uint8_with_zero_points_and_narrow_weights(cnn_cpu_layout):
    module = cnn_cpu_layout
    assert module.backend_name == "onnxruntime"  # the CPU layout never goes to TensorRT
    report = module.precision_report
    assert report.int8_layout == "cpu" and report.float_precision == "fp32"
    graph = module.onnx_model
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    q_zero_points = [inits[n.input[2]] for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert q_zero_points and all(z.dtype == np.uint8 for z in q_zero_points)
    # A ReLU's output is non-negative on the calibration data: zero point 0, all 256 codes.
    assert any(z == 0 for z in q_zero_points) and any(z > 0 for z in q_zero_points)
    weights = [inits[n.input[0]] for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].dtype == np.int8]
    assert weights and max(int(np.abs(w).max()) for w in weights) == 63
    assert not any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)


def test_cpu_layout_runs_every_conv_with_a_quantized_output_on_integer_kernels(cnn_int8, cnn_cpu_layout, tmp_path):
    faithful = optimized_ops(emulate_fp16(cnn_int8[1].onnx_model), tmp_path)
    cpu = optimized_ops(cnn_cpu_layout.onnx_model, tmp_path)
    # The residual Add's Conv-fed input is quantized too, so that Conv runs on QLinearConv as well.
    assert cpu.count("QLinearConv") > faithful.count("QLinearConv"), (cpu, faithful)
    assert cpu.count("MatMulIntegerToFloat") == 1


class HardSwishNet(torch.nn.Module):
    """MobileNetV3's pattern: Convs whose outputs go on through hard-swish and a hard-sigmoid gate."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gate = torch.nn.Conv2d(8, 8, 1)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.hardswish(self.stem(x))
        h = torch.nn.functional.hardswish(self.depthwise(h))
        h = h * torch.nn.functional.hardsigmoid(self.gate(h))
        return self.head(h.mean((2, 3)))


def test_cpu_layout_quantizes_conv_outputs_that_go_on_in_float(digits, tmp_path):
    model = HardSwishNet().eval()
    module = trtopt.compile(
        model, (digits.test_x[:4],), precision="int8", int8_layout="cpu",
        calibration_data=digits.calibration_batches(), dynamic_shapes={"x": {0: (1, 64, 512)}},
    )
    ops = optimized_ops(module.onnx_model, tmp_path)
    # Each Conv's output is quantized before its hard-swish/hard-sigmoid: every Conv is a QLinearConv.
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops, ops
    x = digits.test_x[:256]
    with torch.no_grad():
        expected = model(x).numpy()
    got = module(x.numpy())
    assert float(np.mean(got.argmax(1) == expected.argmax(1))) >= 0.95
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


def test_cpu_layout_accuracy_on_digits(cnn_int8, cnn_cpu_layout, digits):
    model, faithful = cnn_int8
    x = digits.test_x.numpy()
    with torch.no_grad():
        fp32 = top1(model(digits.test_x), digits.test_y)
    assert fp32 - top1(cnn_cpu_layout(x), digits.test_y) <= INT8_TOLERANCE
    assert cnn_cpu_layout.precision_report.accuracy.top1_agreement >= 0.98


def test_cpu_layout_runs_what_its_qdq_graph_computes(cnn_int8, cnn_cpu_layout, digits):
    """ONNX Runtime's own Q/DQ fusions stay on for the CPU layout (every pair sum fits int16 there)
    and off for TensorRT's layout; either way the module computes what the Q/DQ ops compute."""
    assert is_cpu_layout(cnn_cpu_layout.onnx_model)
    assert not is_cpu_layout(cnn_int8[1].onnx_model) and not is_cpu_layout(emulate_fp16(cnn_int8[1].onnx_model))
    x = digits.test_x[:256].numpy()
    graph = cnn_cpu_layout.onnx_model
    want = plain_session(graph, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    got = cnn_cpu_layout(x)
    assert np.abs(got - want).max() <= 0.01 * np.abs(want).max()
    assert float(np.mean(got.argmax(1) == want.argmax(1))) >= 0.99


def test_cpu_layout_survives_save_and_load(cnn_cpu_layout, digits, tmp_path):
    path = cnn_cpu_layout.save(tmp_path / "cpu.trtopt")
    loaded = trtopt.load(path, backend="onnxruntime")
    assert loaded.precision_report.int8_layout == "cpu"
    x = digits.test_x[:16].numpy()
    np.testing.assert_array_equal(loaded(x), cnn_cpu_layout(x))


def test_tensorrt_refuses_the_cpu_layout(cnn_cpu_layout):
    from trtopt.errors import ConfigError, GraphError

    with pytest.raises(GraphError, match="int8_layout='tensorrt'"):
        validate_qdq(cnn_cpu_layout.onnx_model)  # what the TensorRT builder checks first
    with pytest.raises(ConfigError, match="TensorRT cannot build"):
        trtopt.BuildConfig(precision="int8", int8_layout="cpu", backend="tensorrt")
    with pytest.raises(ConfigError, match="precision='int8'"):
        trtopt.BuildConfig(precision="fp16", int8_layout="cpu")
    with pytest.raises(ConfigError, match="weighted layers only"):
        trtopt.BuildConfig(precision="int8", int8_layout="cpu", int8_attention=True)
    with pytest.raises(ConfigError, match="int8_layout='gpu'"):
        trtopt.BuildConfig(precision="int8", int8_layout="gpu")


def test_a_saved_cpu_layout_module_loads_on_onnx_runtime_even_where_tensorrt_runs(cnn_cpu_layout, tmp_path, monkeypatch):
    from trtopt import _deps, compiler
    from trtopt.errors import ConfigError

    path = cnn_cpu_layout.save(tmp_path / "cpu.trtopt")
    # As on a GPU machine: auto would pick TensorRT, which cannot build the CPU layout.
    monkeypatch.setattr(_deps, "tensorrt_unavailable_reason", lambda: None)
    assert compiler.select_backend("auto") is trtopt.Backend.TENSORRT
    assert trtopt.load(path).backend_name == "onnxruntime"
    with pytest.raises(ConfigError, match="int8_layout='tensorrt'"):
        trtopt.load(path, backend="tensorrt")
