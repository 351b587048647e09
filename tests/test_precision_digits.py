"""FP16 and INT8 held to real accuracy: models trained on scikit-learn's digits, scored on held-out digits.

FP16 must stay within 0.3 top-1 points of FP32, INT8 with entropy calibration
within 1.0 point. FP16 graphs run through ``emulate_fp16`` (every FP16 tensor
rounded to FP16, as TensorRT stores it), which the ONNX Runtime backend of a
compiled module also does.
"""

from __future__ import annotations

import onnx
import pytest
import torch

import trtopt
from trtopt.backends.onnxruntime import OnnxRuntimeBackend
from trtopt.bench.digits import top1
from trtopt.calibrators import calibrate
from trtopt.profiles import build_profiles
from trtopt.export import export
from trtopt.graph import cleanup
from trtopt.spec import tensor_specs
from trtopt.precision import emulate_fp16, feed_batches, plan_int8, to_fp16, to_int8, validate_qdq

FP16_TOLERANCE = 0.3  # top-1 points
INT8_TOLERANCE = 1.0


# ------------------------------------------------------------------ CNN, through trtopt.compile


@pytest.fixture(scope="module")
def cnn(digits, digits_cnn):
    model = digits_cnn
    compiled = {}
    for precision in ("fp32", "fp16", "int8"):
        compiled[precision] = trtopt.compile(
            model,
            (digits.test_x[:4],),
            precision=precision,
            calibration_data=digits.calibration_batches(),
            dynamic_shapes={"x": {0: (1, 64, 512)}},
            backend="onnxruntime",
        )
    accuracy = {p: top1(m(digits.test_x), digits.test_y) for p, m in compiled.items()}
    with torch.no_grad():
        accuracy["torch"] = top1(model(digits.test_x), digits.test_y)
    return compiled, accuracy


def test_cnn_trains_to_a_real_accuracy(cnn):
    _, accuracy = cnn
    assert accuracy["torch"] > 95.0
    assert abs(accuracy["fp32"] - accuracy["torch"]) < 1e-9


def test_cnn_fp16_within_tolerance(cnn):
    compiled, accuracy = cnn
    assert abs(accuracy["fp16"] - accuracy["fp32"]) <= FP16_TOLERANCE, accuracy
    graph = compiled["fp16"].onnx_model.graph
    halves = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) >= 8  # every Conv/Gemm weight and bias
    assert compiled["fp16"].precision_report.kept_fp32 == []


def test_cnn_int8_entropy_within_tolerance(cnn):
    compiled, accuracy = cnn
    assert accuracy["fp32"] - accuracy["int8"] <= INT8_TOLERANCE, accuracy
    module = compiled["int8"]
    report = module.precision_report
    ops = [n.op_type for n in module.onnx_model.graph.node]
    assert report.qdq_nodes == ops.count("QuantizeLinear") + ops.count("DequantizeLinear") > 0
    # 4 Conv + 1 Gemm weights, 4 Conv inputs + Gemm input + residual + pool input.
    assert report.quantized_weights == 5 and report.quantized_activations >= 6
    assert report.calibrator == "auto" and report.float_precision == "fp16"
    # One of the 4 batches is held back to measure the module against FP32.
    assert report.calibration_batches == 3 and not report.calibration_from_cache
    readout = report.accuracy
    assert readout.held_back and readout.samples == 64
    assert readout.top1_agreement >= 0.95 and readout.cosine > 0.99
    assert report.overflow_checked and report.kept_fp32 == []
    assert validate_qdq(module.onnx_model) == report.qdq_nodes


def test_cnn_int8_module_saves_and_reloads(cnn, tmp_path):
    compiled, accuracy = cnn
    path = compiled["int8"].save(tmp_path / "cnn_int8.trtopt")
    loaded = trtopt.load(path, backend="onnxruntime")
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(loaded(x), compiled["int8"](x))
    assert loaded.precision_report == compiled["int8"].precision_report


# ------------------------------------------------------------------ transformer, through the passes


@pytest.fixture(scope="module")
def transformer(digits, digits_transformer):
    model = digits_transformer
    x = digits.test_x[:, 0]
    profiles = build_profiles({"x": {0: (1, 64, 512)}}, {"x": (4, 8, 8)})
    graph = cleanup(export(model, (x[:4],), profiles, 19, input_names=["x"]).model)[0]
    calibration = digits.calibration_batches(rows=True)
    inputs = tensor_specs(graph.graph.input)
    _, batches = feed_batches(calibration, inputs)

    def accuracy(candidate: onnx.ModelProto) -> float:
        return top1(OnnxRuntimeBackend(emulate_fp16(candidate)).run({"x": x})[0], digits.test_y)

    with torch.no_grad():
        torch_accuracy = top1(model(x), digits.test_y)
    return graph, calibration, inputs, batches, accuracy, torch_accuracy


def test_transformer_fp16_within_tolerance(transformer):
    graph, _, _, batches, accuracy, torch_accuracy = transformer
    fp32 = accuracy(graph)
    assert torch_accuracy > 90.0 and abs(fp32 - torch_accuracy) < 1e-9
    fp16, report = to_fp16(graph, batches)
    assert abs(accuracy(fp16) - fp32) <= FP16_TOLERANCE
    types = {n.op_type for n in fp16.graph.node}
    assert "LayerNormalization" in types and "Softmax" in types  # run in FP16, not dropped


def test_transformer_int8_entropy_within_tolerance(transformer):
    graph, calibration, inputs, batches, accuracy, _ = transformer
    plan = plan_int8(graph)
    # The attention products (activation x activation) stay in float; all Linear layers are quantized.
    assert {op for op in (k.op for k in plan.skipped)} == {"MatMul"}
    assert len(plan.weights) == 10
    amax = calibrate(graph, plan.activation_tensors, calibration, input_specs=inputs, method="entropy", progress=False).amax
    int8, report, fp16_report = to_int8(graph, plan, amax, batches)
    assert accuracy(graph) - accuracy(int8) <= INT8_TOLERANCE
    assert validate_qdq(int8) == report.q_nodes + report.dq_nodes
    assert fp16_report is not None


def test_transformer_int8_attention_option(transformer):
    """int8_attention quantizes attention's Q.K^T and P.V inputs too (TensorRT's INT8 MHA placement)."""
    graph, calibration, inputs, batches, accuracy, _ = transformer
    default, with_attention = plan_int8(graph), plan_int8(graph, quantize_attention=True)
    products = [k.name for k in default.skipped if k.op == "MatMul"]
    assert len(products) == 4  # 2 layers x (Q.K^T, P.V)
    assert not [k for k in with_attention.skipped if k.op == "MatMul"]
    for name in products:
        assert {(name, 0), (name, 1)} <= {use for uses in with_attention.activations.values() for use in uses}
    amax = calibrate(graph, with_attention.activation_tensors, calibration, input_specs=inputs, progress=False).amax
    int8, report, _ = to_int8(graph, with_attention, amax, batches)
    assert validate_qdq(int8) == report.q_nodes + report.dq_nodes
    assert accuracy(graph) - accuracy(int8) <= INT8_TOLERANCE
