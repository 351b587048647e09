"""precision="fp8": FP8 E4M3 Q/DQ written as TensorRT builds it, run faithfully on the CPU, held to accuracy.

What is pinned here:
- the graph carries FLOAT8E4M3FN Q/DQ (zero point 0, scale amax/448, weights per channel) exactly on
  the planned tensors, and passes the Q/DQ validator; FP8's placement rules (no pooling Q/DQ, Convs
  without an FP8 kernel shape left in float) are reported;
- quantization saturates at +-448 and rounds ties to even, as TensorRT's castToFp8(clip(x/s)) does,
  in the sessions trtopt opens on the CPU (ONNX Runtime's Relu-before-Q rewrite is kept off);
- a trained digits CNN at FP8 stays within 0.3 top-1 points of FP32; the module saves, loads, exports
  (build script, no calibration cache), re-compiles as a carried FP8 graph, and goes to Triton;
- the accuracy budget, the calibration cache and the CLI work at FP8;
- the TensorRT builder (through tests/trt_doubles.py) refuses FP8 on compute capability 8.6 and on a
  TensorRT without DataType.FP8, and builds it on 8.9 and 9.0.
"""

from __future__ import annotations

import enum
import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import trtopt
from trtopt import _deps, cli
from trtopt.backends.tensorrt import build as builder
from trtopt.backends.onnxruntime import OnnxRuntimeBackend
from trtopt.executor.session import make_session
from trtopt.executor.qdq_cpu import lower_qdq_for_cpu
from trtopt.calibrators import calibrate
from trtopt.config import BuildConfig
from trtopt.profiles import InputRange, ShapeProfile, build_profiles
from trtopt.bench.digits import DigitsCNN, top1
from trtopt.errors import ConfigError, DependencyError, GraphError
from trtopt.export import export
from trtopt.graph import cleanup
from trtopt.spec import tensor_specs
from trtopt.precision import (
    FP8,
    INT8,
    emulate_fp16,
    feed_batches,
    plan_int8,
    quantize_int8,
    to_int8,
    validate_qdq,
)
from trtopt.precision.budget import keep_high

from .trt_doubles import FakeCuda, FakeTensorRT

FP8_TOLERANCE = 0.3  # top-1 points, the target for CNNs


def tensorrt_fp8(x: np.ndarray, scale: float) -> np.ndarray:
    """TensorRT's FP8 Q/DQ: castToFp8(clip(x / s, -448, 448)) * s, round to nearest even."""
    clipped = np.clip(x.astype(np.float32) / np.float32(scale), -448, 448)
    return clipped.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(scale)


def exported(model: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    profiles = build_profiles({"x": {0: (1, 64, 512)}}, {"x": tuple(example.shape)})
    return cleanup(export(model, (example,), profiles, 19, input_names=["x"]).model)[0]


@pytest.fixture(scope="module")
def cnn_graph(digits, digits_cnn):
    return exported(digits_cnn, digits.test_x[:4])


# ------------------------------------------------------------------ the graph


def test_fp8_graph_carries_float8_qdq_on_the_planned_tensors(cnn_graph):
    plan = plan_int8(cnn_graph, fmt="fp8")
    assert plan.fmt is FP8
    # The stem Conv (1 input channel) has no FP8 kernel shape and stays in float, with the reason.
    skipped = {k.op: k.reason for k in plan.skipped}
    assert list(skipped) == ["Conv"] and "16+ input and output channels" in skipped["Conv"]
    assert len(plan.weights) == 4  # 3 Convs + the Gemm head
    # No pooling input is quantized at FP8 (INT8 quantizes the MaxPool's input).
    int8_plan = plan_int8(cnn_graph)
    pooled = {n.input[0] for n in cnn_graph.graph.node if n.op_type == "MaxPool"}
    assert pooled & set(int8_plan.activation_tensors) and not pooled & set(plan.activation_tensors)

    amax = {name: 2.0 for name in plan.activation_tensors}
    graph, report = quantize_int8(cnn_graph, plan, amax)
    assert validate_qdq(graph) == report.q_nodes + report.dq_nodes
    inits = {i.name: i for i in graph.graph.initializer}
    zero_points = [i for name, i in inits.items() if name.endswith("__zero_point")]
    assert zero_points and {i.data_type for i in zero_points} == {TensorProto.FLOAT8E4M3FN}
    assert all(not numpy_helper.to_array(i).astype(np.float32).any() for i in zero_points)
    quantized = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(n.input[0] for n in quantized) == sorted(plan.activation_tensors)
    for q in quantized:
        assert numpy_helper.to_array(inits[q.input[1]]) == pytest.approx(2.0 / 448)
    # Weights: stored as FP8 with one scale per output channel, read by the planned ops.
    weights = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None]
    assert len(weights) == 4
    for dq in weights:
        codes = inits[dq.input[0]]
        assert codes.data_type == TensorProto.FLOAT8E4M3FN
        channels = numpy_helper.to_array(codes).shape[next(a.i for a in dq.attribute if a.name == "axis")]
        assert numpy_helper.to_array(inits[dq.input[1]]).shape == (channels,)
        assert np.abs(numpy_helper.to_array(codes).astype(np.float32)).max() == 448.0  # each channel's peak


def test_fp8_weights_round_to_nearest_even_and_saturate():
    values = np.array([1.0625, 17.0, 19.0, 447.0, 460.0, -1000.0], np.float32)
    codes = FP8.encode(values).astype(np.float32)
    assert codes.tolist() == [1.0, 16.0, 20.0, 448.0, 448.0, -448.0]  # ties to even; no NaN past 448
    assert INT8.encode(np.array([2.5, 3.5, 200.0])).tolist() == [2, 4, 127]


def fp8_qdq_graph(first: str | None, scale: float) -> onnx.ModelProto:
    """x -> [first] -> Q(FP8) -> DQ -> y, as quantize_int8 writes an activation pair."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e4m3fn), "zp"),
    ]
    nodes = [helper.make_node(first, ["x"], ["a"])] if first else []
    source = "a" if first else "x"
    nodes += [
        helper.make_node("QuantizeLinear", [source, "s", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq"),
    ]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 19)])


def test_cpu_sessions_saturate_at_448_and_round_as_tensorrt_does():
    scale = 0.01  # amax 4.48
    x = np.array([0, 1e-6, 0.0105, 0.017, 0.019, 1.0, 4.47, 4.48, 4.5, 4.64, 100, -100, np.inf, -np.inf], np.float32)
    got = make_session(fp8_qdq_graph(None, scale)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, tensorrt_fp8(x, scale))
    # Beyond amax (448 steps) the value is amax: saturated, never Inf or NaN.
    assert got[-6:].tolist() == pytest.approx([4.48, 4.48, 4.48, -4.48, 4.48, -4.48])
    rng = np.random.default_rng(0)
    wide = (rng.standard_normal(4096) * 3).astype(np.float32)
    np.testing.assert_array_equal(make_session(fp8_qdq_graph(None, scale)).run(None, {"x": wide})[0], tensorrt_fp8(wide, scale))


def test_cpu_sessions_keep_the_relu_in_front_of_an_fp8_quantize():
    # ONNX Runtime's ReluQuantRewrite drops this Relu (as for a uint8 Q, which clips at 0); FP8 is
    # signed, so negative values would come through. trtopt's sessions turn that rewrite off.
    graph = fp8_qdq_graph("Relu", 0.01)
    x = np.array([-3.0, -0.5, 0.0, 0.5, 3.0], np.float32)
    np.testing.assert_array_equal(make_session(graph).run(None, {"x": x})[0], tensorrt_fp8(np.maximum(x, 0), 0.01))


def test_fp8_graphs_skip_the_int8_cpu_layout(cnn_graph):
    plan = plan_int8(cnn_graph, fmt="fp8")
    graph, _ = quantize_int8(cnn_graph, plan, {t: 2.0 for t in plan.activation_tensors})
    assert lower_qdq_for_cpu(graph) is graph  # no QLinearConv, no uint8 re-encoding, no folded weights


# ------------------------------------------------------------------ the validator


def test_validator_accepts_fp8_and_names_what_tensorrt_refuses():
    assert validate_qdq(fp8_qdq_graph(None, 0.5)) == 2
    not_saturating = fp8_qdq_graph(None, 0.5)
    not_saturating.graph.node[0].attribute.append(helper.make_attribute("saturate", 0))
    with pytest.raises(GraphError, match="saturate=0.*448"):
        validate_qdq(not_saturating)
    old = fp8_qdq_graph(None, 0.5)
    old.opset_import[0].version = 18
    with pytest.raises(GraphError, match="FP8.*opset 19"):
        validate_qdq(old)
    shifted = fp8_qdq_graph(None, 0.5)
    shifted.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones((), ml_dtypes.float8_e4m3fn), "zp"))
    with pytest.raises(GraphError, match="zero point 0"):
        validate_qdq(shifted)


def test_config_checks_fp8_settings():
    assert BuildConfig(precision="fp8").calibration_method.value == "minmax"
    assert BuildConfig(precision="int8").calibration_method.value == "auto"
    assert BuildConfig(precision="fp8", calibrator="entropy").calibration_method.value == "entropy"
    with pytest.raises(ConfigError, match="opset 19"):
        BuildConfig(precision="fp8", opset=18)
    with pytest.raises(ConfigError, match="int8_float_precision='fp8'"):
        BuildConfig(int8_float_precision="fp8")


# ------------------------------------------------------------------ a trained CNN, end to end


@pytest.fixture(scope="module")
def cnn(digits, digits_cnn):
    model = digits_cnn
    compiled = {
        precision: trtopt.compile(
            model, (digits.test_x[:4],), precision=precision,
            calibration_data=digits.calibration_batches() if precision != "fp32" else None,
            dynamic_shapes={"x": {0: (1, 64, 512)}}, backend="onnxruntime",
        )
        for precision in ("fp32", "fp8")
    }
    return compiled, {p: top1(m(digits.test_x), digits.test_y) for p, m in compiled.items()}


def test_cnn_fp8_within_tolerance_of_fp32(cnn):
    compiled, accuracy = cnn
    assert accuracy["fp32"] > 95.0
    assert accuracy["fp32"] - accuracy["fp8"] <= FP8_TOLERANCE, accuracy
    module = compiled["fp8"]
    report = module.precision_report
    assert module.precision == report.precision == "fp8" and report.calibrator == "minmax"
    assert report.float_precision == "fp16" and report.quantized_weights == 4
    assert validate_qdq(module.onnx_model) == report.qdq_nodes > 0
    readout = report.accuracy
    assert readout.held_back and readout.top1_agreement >= 0.95 and readout.cosine > 0.99


def test_fp8_module_saves_loads_and_exports(cnn, digits, tmp_path):
    module = cnn[0]["fp8"]
    loaded = trtopt.load(module.save(tmp_path / "cnn_fp8.trtopt"), backend="onnxruntime")
    x = digits.test_x[:16]
    assert torch.equal(loaded(x), module(x)) and loaded.precision == "fp8"

    paths = module.export_onnx(tmp_path / "deploy" / "cnn.onnx")
    assert "calibration_cache" not in paths  # FP8 scales live only in the graph
    script = paths["build_script"].read_text()
    assert "--stronglyTyped" in script and "--fp8" not in script and "--int8" not in script
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["precision"] == "fp8" and manifest["precision_summary"]["activation_amax"]
    # The exported graph builds as it is elsewhere: compile() sees FP8 in it and does not recalibrate.
    again = trtopt.compile(str(paths["onnx"]), dynamic_shapes={"x": {0: (1, 64, 512)}}, backend="onnxruntime")
    assert again.precision == "fp8" and again.precision_report.from_graph
    assert torch.equal(again(x), module(x))


def test_fp8_triton_export_keeps_onnxruntime_from_dropping_relus(cnn, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    model_dir = cnn[0]["fp8"].export_triton(tmp_path / "repo", "cnn")
    config = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "level: -1" in config
    assert "level" not in (cnn[0]["fp32"].export_triton(tmp_path / "repo", "cnn32") / "config.pbtxt").read_text()


def test_fp8_calibration_cache_is_reused(digits, trained_digits, tmp_path):
    model = trained_digits.get(DigitsCNN, epochs=1)
    settings = dict(precision="fp8", dynamic_shapes={"x": {0: (1, 64, 512)}}, backend="onnxruntime",
                    calibration_cache=str(tmp_path / "cnn.cache"))
    first = trtopt.compile(model, (digits.test_x[:4],), calibration_data=digits.calibration_batches(), **settings)
    assert (tmp_path / "cnn.cache").read_text().startswith("TRT-") and not first.precision_report.calibration_from_cache
    second = trtopt.compile(model, (digits.test_x[:4],), **settings)  # no data: the cache holds the ranges
    assert second.precision_report.calibration_from_cache
    assert second.precision_report.activation_amax == pytest.approx(first.precision_report.activation_amax)


def test_fp8_accuracy_budget_keeps_units_out_of_fp8(digits, trained_digits, tmp_path):
    model = trained_digits.get(DigitsCNN, epochs=4)
    module = trtopt.compile(
        model, (digits.test_x[:4],), precision="fp8", calibration_data=digits.calibration_batches(),
        dynamic_shapes={"x": {0: (1, 64, 512)}}, backend="onnxruntime",
        accuracy_budget="cosine>=0.9995", sensitivity_cache_dir=str(tmp_path),
    )
    budget = module.precision_report.accuracy_budget
    assert budget.met and budget.kept_high
    # The units left quantized are still FP8: the budget's plans keep the format.
    zero_points = [i for i in module.onnx_model.graph.initializer if i.name.endswith("__zero_point")]
    assert zero_points and {i.data_type for i in zero_points} == {TensorProto.FLOAT8E4M3FN}
    plan = plan_int8(exported(model, digits.test_x[:4]), fmt="fp8")
    assert keep_high(plan, [plan.weights[0][0]], {}).fmt is FP8


def test_fp8_accuracy_budget_failure_names_fp8(digits, trained_digits, tmp_path):
    # An error of 0 is out of reach even with every unit kept high (the float part rounds to FP16).
    with pytest.raises(trtopt.AccuracyBudgetError, match="^FP8 cannot meet the accuracy budget"):
        trtopt.compile(
            trained_digits.get(DigitsCNN, epochs=4), (digits.test_x[:4],), precision="fp8",
            calibration_data=digits.calibration_batches(), dynamic_shapes={"x": {0: (1, 64, 512)}},
            backend="onnxruntime", accuracy_budget="max_abs<=0", sensitivity_cache_dir=str(tmp_path),
        )


def test_transformer_fp8_within_tolerance(digits, digits_transformer):
    model = digits_transformer
    x = digits.test_x[:, 0]
    graph = exported(model, x[:4])
    calibration = digits.calibration_batches(rows=True)
    inputs = tensor_specs(graph.graph.input)
    _, batches = feed_batches(calibration, inputs)
    plan = plan_int8(graph, fmt="fp8")
    assert len(plan.weights) == 10  # every Linear; the attention products stay in float
    amax = calibrate(graph, plan.activation_tensors, calibration, input_specs=inputs, method="minmax", progress=False).amax
    fp8, report, _ = to_int8(graph, plan, amax, batches)

    def accuracy(candidate: onnx.ModelProto) -> float:
        return top1(OnnxRuntimeBackend(emulate_fp16(candidate)).run({"x": x})[0], digits.test_y)

    assert accuracy(graph) - accuracy(fp8) <= 1.0
    assert validate_qdq(fp8) == report.q_nodes + report.dq_nodes


def test_cli_compiles_and_inspects_fp8(cnn_graph, digits, tmp_path, capsys):
    source = tmp_path / "cnn.onnx"
    onnx.save(cnn_graph, source)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=digits.train_x[:256].numpy())
    out = tmp_path / "cnn_fp8.trtopt"
    code = cli.main(["compile", str(source), "--precision", "fp8", "--calib", str(calib),
                     "--shapes", "x:1x1x8x8,64x1x8x8,512x1x8x8", "--backend", "onnxruntime", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "precision fp8" in shown and "calibrator: minmax" in shown


# ------------------------------------------------------------------ TensorRT, through the doubles


def small_graph(fmt: str) -> onnx.ModelProto:
    """A two-layer MLP quantized in ``fmt`` (ranges made up: the doubles build, they do not compute)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    graph = exported(model, torch.randn(4, 32))
    plan = plan_int8(graph, fmt=fmt)
    return quantize_int8(graph, plan, {t: 3.0 for t in plan.activation_tensors})[0]


@pytest.fixture(scope="module")
def small_fp8_graph() -> onnx.ModelProto:
    return small_graph("fp8")


def profile() -> ShapeProfile:
    return ShapeProfile((InputRange("x", (1, 32), (8, 32), (16, 32), (0,)),))


def test_builder_refuses_fp8_below_compute_capability_8_9(fake_trt, small_fp8_graph):
    FakeCuda.compute_capability = (8, 6)
    with pytest.raises(DependencyError) as error:
        builder.build_engine(small_fp8_graph, [profile()], BuildConfig())
    message = str(error.value)
    assert "Fake GPU 80GB" in message and "8.6" in message and "8.9" in message
    assert "precision='fp16'" in message and "precision='int8'" in message
    assert fake_trt.builds == 0
    # The alternatives the message names do build on that GPU.
    assert builder.build_engine(small_graph("int8"), [profile()], BuildConfig()).startswith(b"FAKE-ENGINE")


@pytest.mark.parametrize("capability", [(8, 9), (9, 0)])
def test_builder_builds_fp8_on_ada_and_hopper(fake_trt, small_fp8_graph, capability):
    FakeCuda.compute_capability = capability
    assert builder.build_engine(small_fp8_graph, [profile()], BuildConfig()).startswith(b"FAKE-ENGINE")
    assert fake_trt.builds == 1


def test_builder_refuses_fp8_on_a_tensorrt_without_it(fake_trt, small_fp8_graph, monkeypatch):
    no_fp8 = enum.IntEnum("DataType", {m: i for i, m in enumerate(("FLOAT", "HALF", "INT8", "INT32", "BOOL"))})
    monkeypatch.setattr(FakeTensorRT, "DataType", no_fp8)
    FakeCuda.compute_capability = (9, 0)
    with pytest.raises(DependencyError, match="no FP8 support.*precision='fp16' or precision='int8'"):
        builder.build_engine(small_fp8_graph, [profile()], BuildConfig())


def test_compile_refuses_fp8_on_an_old_gpu_before_exporting(monkeypatch):
    from trtopt import compiler

    fake, cuda = FakeTensorRT(), FakeCuda()
    FakeCuda.compute_capability = (8, 6)
    monkeypatch.setattr(_deps, "_import", lambda name: {"tensorrt": fake, "pycuda.driver": cuda}.get(name))
    monkeypatch.setattr(compiler, "export", lambda *a, **k: pytest.fail("exported before refusing FP8"))
    _deps.tensorrt_unavailable_reason.cache_clear()
    try:
        model = torch.nn.Linear(32, 4).eval()
        with pytest.raises(DependencyError, match="compute capability 8.6"):
            trtopt.compile(model, (torch.randn(2, 32),), precision="fp8", backend="tensorrt",
                           calibration_data=[torch.randn(2, 32)])
    finally:
        _deps.tensorrt_unavailable_reason.cache_clear()


def test_fp8_plan_honours_exclusions(cnn_graph):
    plan = plan_int8(cnn_graph, fmt="fp8", exclude_op_types=["Gemm"])
    assert [k.op for k in plan.skipped].count("Gemm") == 1 and len(plan.weights) == 3
    plan = plan_int8(cnn_graph, fmt="fp8", keep_first_last=True)
    assert len(plan.weights) == 2  # the first and last of the four FP8 units stay high
