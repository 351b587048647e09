"""The precision passes on small graphs: FP16 keep-list and overflow, Q/DQ placement, the validator."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import trtopt
from trtopt.executor.fp16_emulation import check_against_engine
from trtopt.backends.onnxruntime import OnnxRuntimeBackend
from trtopt.profiles import build_profiles
from trtopt.errors import CalibrationError, GraphError
from trtopt.export import export
from trtopt.graph import cleanup
from trtopt.precision import (
    convert_to_fp16,
    emulate_fp16,
    plan_int8,
    quantize_int8,
    tensor_ranges,
    to_fp16,
    to_int8,
    validate_qdq,
)


def exported(model: nn.Module, example: torch.Tensor, batch: tuple[int, int, int] = (1, 8, 64)) -> onnx.ModelProto:
    profiles = build_profiles({"x": {0: batch}}, {"x": tuple(example.shape)})
    return cleanup(export(model.eval(), (example,), profiles, 19, input_names=["x"]).model)[0]


def run(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    return OnnxRuntimeBackend(model).run({"x": x})[0].numpy()


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ------------------------------------------------------------------ FP16


class Energy(nn.Module):
    """Its squared activations reach ~1e5..1e6, beyond FP16's 65504; its outputs are small."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x) * 300.0
        energy = (h * h).sum(dim=-1, keepdim=True)
        return torch.cat([h / 1000.0, torch.sqrt(energy) / 1000.0], dim=-1)


@pytest.fixture(scope="module")
def energy():
    torch.manual_seed(0)
    data = torch.randn(64, 8)
    model = Energy().eval()
    batches = lambda: iter([{"x": b.numpy()} for b in data.split(16)])  # noqa: E731
    return model, exported(model, data[:4]), batches, torch.randn(32, 8)


def test_fp16_keeps_overflowing_nodes_fp32_and_stays_finite(energy):
    model, graph, batches, x = energy
    converted, report = to_fp16(graph, batches)
    kept = {k.op: k.reason for k in report.kept}
    assert "Mul" in kept and "ReduceSum" in kept, report.kept
    assert "reaches" in kept["ReduceSum"] and "threshold" in kept["ReduceSum"]
    # The rest really is FP16: Gemm's weights are float16 initializers.
    halves = [i for i in converted.graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert halves
    # FP32 in, FP32 out.
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    out = run(emulate_fp16(converted), x)
    assert np.isfinite(out).all()
    expected = model(x).detach().numpy()
    assert np.abs(out - expected).max() / np.abs(expected).max() < 5e-3


def test_fp16_without_keep_list_overflows(energy):
    _, graph, batches, x = energy
    # The same conversion with no measured ranges (nothing kept by range) and no repair.
    plain, report = convert_to_fp16(graph, ranges=None)
    assert report.kept == []
    ranges = tensor_ranges(emulate_fp16(plain), batches())
    squares = next(n.output[0] for n in plain.graph.node if n.op_type == "Mul" and n.input[0] == n.input[1])
    assert ranges[squares] == math.inf
    assert not np.isfinite(run(emulate_fp16(plain), x)).all()
    # The Inf/NaN check repairs the same graph by itself (nothing kept by range), naming why.
    repaired, report = to_fp16(graph, batches, threshold=math.inf)
    # One round per node: the square overflows, then its sum, then the sum's square root.
    assert {k.op for k in report.kept} == {"Mul", "ReduceSum", "Sqrt"}
    assert all("Inf/NaN" in k.reason for k in report.kept)
    assert np.isfinite(run(emulate_fp16(repaired), x)).all()


class Heads(nn.Module):
    """Splits features into heads and back: Reshape, Transpose and Relu between two Linears."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).reshape(-1, 4, 4).transpose(1, 2).relu()
        return self.b(h.reshape(-1, 16))


def test_fp16_emulation_rounds_only_where_values_change(monkeypatch):
    x = torch.randn(32, 16) * 3
    plain, _ = convert_to_fp16(exported(Heads(), x[:4]), ranges=None)
    emulated = emulate_fp16(plain)
    producers = {o: n.op_type for n in emulated.graph.node for o in n.output}
    rounded_by = [producers[n.input[0]] for n in emulated.graph.node
                  if n.op_type == "Cast" and n.output[0].endswith("__as_fp16")]
    # The Linears' outputs are rounded; Reshape, Transpose and Relu of FP16 values give FP16 values.
    assert rounded_by and not {"Reshape", "Transpose", "Relu"} & set(rounded_by), rounded_by
    assert {"Reshape", "Transpose", "Relu"} <= {n.op_type for n in plain.graph.node}
    # Bit for bit what rounding every FP16 tensor computes.
    monkeypatch.setattr("trtopt.executor.fp16_emulation.already_fp16", lambda model, names: set())
    every = emulate_fp16(plain)
    assert sum(n.op_type == "Cast" for n in every.graph.node) > sum(n.op_type == "Cast" for n in emulated.graph.node)
    assert np.array_equal(run(emulated, x), run(every, x))


def test_fp16_emulation_is_checked_against_an_engine_listing():
    """``check_against_engine`` on a hand-written engine inspector listing: a test double of the
    JSON TensorRT writes (each layer's outputs with their format and data type)."""
    plain, _ = convert_to_fp16(exported(Heads(), torch.randn(4, 16)), ranges=None)
    fp16 = "Row major linear FP16 format"
    layers = [  # the engine fused the input Cast into the first Gemm, so "x__cast_float16" is never stored
        {"Name": "a", "Outputs": [{"Name": "linear", "Format/Datatype": fp16}]},
        {"Name": "shuffle + relu + shuffle", "Outputs": [{"Name": "_unsafe_view", "Format/Datatype": "Half"}]},
        {"Name": "b", "Outputs": [{"Name": "output__fp16", "Format/Datatype": fp16}]},
        {"Name": "cast", "Outputs": [{"Name": "output", "Format/Datatype": "Row major linear FP32 format"}]},
    ]
    check = check_against_engine(plain, {"Layers": layers})
    # "_unsafe_view" is not rounded, but the emulation knows it holds FP16 values (a Reshape of them).
    assert check == {"rounded_not_stored": ["x__cast_float16"], "stored_not_rounded": []}
    layers[-1]["Outputs"][0]["Format/Datatype"] = "Half"  # an FP32 output the engine writes in FP16
    assert check_against_engine(plain, {"Layers": layers})["stored_not_rounded"] == ["output"]


def test_fp16_exclusions_and_oversized_weights_are_reported():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    big = numpy_helper.from_array(np.full((4,), 1e5, np.float32), "big")
    small = numpy_helper.from_array(np.full((4,), 1e-5, np.float32), "small")
    nodes = [
        helper.make_node("Mul", ["x", "big"], ["scaled"], name="scale_up"),
        helper.make_node("Mul", ["scaled", "small"], ["back"], name="scale_down"),
        helper.make_node("Relu", ["back"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["r"], ["y"], name="gate"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], [big, small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    converted, report = convert_to_fp16(model, exclude_nodes=["rel*"], exclude_op_types=["Sigmoid"])
    reasons = {k.name: k.reason for k in report.kept}
    assert "beyond FP16" in reasons["scale_up"]
    assert "pattern 'rel*'" in reasons["relu"]
    assert "op type Sigmoid" in reasons["gate"]
    assert "scale_down" not in reasons
    data = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    out = OnnxRuntimeBackend(converted).run({"x": torch.from_numpy(data)})[0].numpy()
    assert np.allclose(out, 1 / (1 + np.exp(-np.maximum(data, 0))), atol=2e-3)


def test_fp16_without_calibration_data_converts_without_a_keep_list(energy):
    _, graph, _, _ = energy
    converted, report = to_fp16(graph, None)
    assert report.kept == [] and report.converted_nodes > 0
    assert TensorProto.FLOAT16 in {i.data_type for i in converted.graph.initializer}


def test_compile_fp16_reports_kept_nodes(energy):
    model, _, _, x = energy
    calibration = list(torch.randn(64, 8).split(16))
    fast = trtopt.compile(
        model, (x[:4],), precision="fp16", calibration_data=calibration,
        dynamic_shapes={"x": {0: (1, 8, 64)}}, backend="onnxruntime",
    )
    report = fast.precision_report
    assert report.precision == "fp16" and report.qdq_nodes == 0 and report.overflow_checked
    assert {k["op"] for k in report.kept_fp32} >= {"Mul", "ReduceSum"}
    out = fast(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ------------------------------------------------------------------ INT8 placement


class Mixed(nn.Module):
    """Conv, a residual Add, MaxPool, ConvTranspose, a 3-D Linear (MatMul) and a 2-D Linear (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.mix = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = y + self.conv2(y)
        y = self.up(self.pool(y))  # [B, 6, 8, 8]
        seq = torch.relu(self.mix(y.flatten(2).transpose(1, 2)))  # [B, 64, 8]
        return self.fc(seq.mean(dim=1))


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    model = Mixed().eval()
    data = torch.rand(64, 1, 8, 8)
    graph = exported(model, data[:4])
    batches = lambda: iter([{"x": b.numpy()} for b in data.split(16)])  # noqa: E731
    ranges = tensor_ranges(graph, batches())
    return model, graph, batches, ranges, torch.rand(16, 1, 8, 8)


def _dq_axes(model: onnx.ModelProto) -> dict[str, int]:
    """Weighted op type -> axis of the per-channel DequantizeLinear feeding its weight."""
    producers = {o: n for n in model.graph.node for o in n.output}
    axes = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and node.input[1] in producers:
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            axes.setdefault(node.op_type, set()).add(helper.get_attribute_value(dq.attribute[0]))
    return {op: a.pop() for op, a in axes.items() if len(a) == 1}


def test_int8_placement_axes_residual_and_pooling(mixed):
    model, graph, batches, ranges, x = mixed
    plan = plan_int8(graph)
    consumers = {n.name: n.op_type for n in graph.graph.node}
    uses = {consumers[node] for users in plan.activations.values() for node, _ in users}
    assert uses == {"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "MaxPool"}
    quantized, report = quantize_int8(graph, plan, {t: ranges[t] for t in plan.activation_tensors}, ranges=ranges)
    assert _dq_axes(quantized) == {"Conv": 0, "ConvTranspose": 1, "MatMul": 1, "Gemm": 0}
    # Outputs of weighted ops are never quantized.
    weighted_outputs = {o for n in graph.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") for o in n.output}
    assert not weighted_outputs & set(plan.activation_tensors)
    assert validate_qdq(quantized) == report.q_nodes + report.dq_nodes == ops(quantized).count("QuantizeLinear") + ops(
        quantized
    ).count("DequantizeLinear")
    expected = model(x).detach().numpy()
    assert np.abs(run(quantized, x) - expected).max() / np.abs(expected).max() < 0.05


def test_int8_weights_are_symmetric_round_half_even(mixed):
    _, graph, _, ranges, _ = mixed
    plan = plan_int8(graph)
    quantized, _ = quantize_int8(graph, plan, {t: ranges[t] for t in plan.activation_tensors})
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    originals = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    weight = originals["conv2.weight"]
    q, scale = inits["conv2.weight__int8"], inits["conv2.weight__scale"]
    assert q.dtype == np.int8 and scale.shape == (weight.shape[0],)
    assert np.allclose(scale, np.abs(weight).reshape(4, -1).max(axis=1) / 127)
    assert np.array_equal(q, np.rint(weight / scale[:, None, None, None]).astype(np.int8))
    assert np.abs(q).max() == 127


def test_int8_exclusions_and_first_last(mixed):
    _, graph, _, _, _ = mixed
    plan = plan_int8(graph, keep_first_last=True, exclude_op_types=["ConvTranspose"])
    skipped = {k.op: k.reason for k in plan.skipped}
    assert "first weighted layer" in skipped["Conv"]
    assert "last weighted layer" in skipped["Gemm"]
    assert "excluded by the user" in skipped["ConvTranspose"]
    quantized_ops = {n for n, _, _ in plan.weights}
    by_name = {n.name: n.op_type for n in graph.graph.node}
    assert sorted(by_name[n] for n in quantized_ops) == ["Conv", "MatMul"]


@pytest.mark.parametrize("float_precision", ["fp16", "fp32"])
def test_int8_rest_of_graph_precision(mixed, float_precision):
    model, graph, batches, ranges, x = mixed
    plan = plan_int8(graph)
    amax = {t: ranges[t] for t in plan.activation_tensors}
    quantized, report, fp16_report = to_int8(graph, plan, amax, batches, float_precision=float_precision)
    scales = [i for i in quantized.graph.initializer if "__scale" in i.name]
    want = TensorProto.FLOAT16 if float_precision == "fp16" else TensorProto.FLOAT
    assert scales and {s.data_type for s in scales} == {want}
    assert (fp16_report is not None) == (float_precision == "fp16")
    expected = model(x).detach().numpy()
    assert np.abs(run(quantized, x) - expected).max() / np.abs(expected).max() < 0.05


def test_int8_dequantize_follows_a_consumer_kept_fp32(mixed):
    model, graph, batches, ranges, x = mixed
    plan = plan_int8(graph)
    amax = {t: ranges[t] for t in plan.activation_tensors}
    # A threshold this low keeps most float nodes FP32, quantized ones included.
    quantized, _, fp16_report = to_int8(graph, plan, amax, batches, threshold=1.0)  # validates
    kept = {k.name: k.reason for k in fp16_report.kept}
    conv1 = next(n for n in quantized.graph.node if n.op_type == "Conv" and n.input[1].startswith("conv1"))
    assert conv1.name in kept
    producers = {o: n for n in quantized.graph.node for o in n.output}
    assert producers[conv1.input[1]].op_type == "DequantizeLinear"  # no Cast in between
    assert kept[producers[conv1.input[1]].name] == "feeds only nodes kept in FP32"
    expected = model(x).detach().numpy()
    assert np.abs(run(emulate_fp16(quantized), x) - expected).max() / np.abs(expected).max() < 0.05


def test_int8_missing_amax_is_a_calibration_error(mixed):
    _, graph, _, _, _ = mixed
    with pytest.raises(CalibrationError, match="no calibrated amax"):
        quantize_int8(graph, plan_int8(graph), {})


def test_compile_int8_passes_the_options_through(mixed):
    model, _, _, _, x = mixed
    fast = trtopt.compile(
        model, (x[:4],), precision="int8", calibration_data=list(x.split(4)), backend="onnxruntime",
        calibrator="minmax", int8_keep_first_last=True, exclude_op_types=["ConvTranspose"],
        int8_float_precision="fp32",
    )
    report = fast.precision_report
    assert report.calibrator == "minmax" and report.float_precision == "fp32"
    assert sorted(k["op"] for k in report.not_quantized) == ["Conv", "ConvTranspose", "Gemm"]
    assert report.quantized_weights == 2 and report.kept_fp32 is None
    assert TensorProto.FLOAT16 not in {i.data_type for i in fast.onnx_model.graph.initializer}
    expected = model(x[:4]).detach()
    assert (fast(x[:4]) - expected).abs().max() / expected.abs().max() < 0.05


def test_compile_int8_without_calibration_data_says_what_to_pass():
    with pytest.raises(CalibrationError, match="calibration_data"):
        trtopt.compile(nn.Linear(4, 2), (torch.randn(2, 4),), precision="int8", backend="onnxruntime")


# ------------------------------------------------------------------ validator


def qdq_model(
    *,
    zero_point: int = 0,
    act_scale: float | list[float] = 0.1,
    weight_axis: int = 0,
    opset: int = 19,
    scale_dtype: type = np.float32,
    with_q_zero_point: bool = True,
) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv, with an INT8 weight behind a per-channel DQ; knobs make it wrong."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    act_scale_arr = np.array(act_scale, scale_dtype)
    zp_shape = act_scale_arr.shape
    inits = [
        numpy_helper.from_array(act_scale_arr, "s"),
        numpy_helper.from_array(np.full(zp_shape, zero_point, np.int8), "zp"),
        numpy_helper.from_array(np.ones((3, 2, 3, 3), np.int8), "w_q"),
        numpy_helper.from_array(np.full((3,), 0.02, scale_dtype), "w_s"),
        numpy_helper.from_array(np.zeros((3,), np.int8), "w_zp"),
    ]
    per_axis = {"axis": 1} if act_scale_arr.ndim else {}
    cast = [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16)] if scale_dtype is np.float16 else []
    src = "xh" if cast else "x"
    nodes = cast + [
        helper.make_node("QuantizeLinear", [src, "s", "zp"] if with_q_zero_point else [src, "s"], ["xq"], name="q_x", **per_axis),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"] if with_q_zero_point else ["xq", "s"], ["xd"], name="dq_x", **per_axis),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w", axis=weight_axis),
        helper.make_node("Conv", ["xd", "w"], ["yc"], name="conv", pads=[1, 1, 1, 1]),
    ]
    nodes.append(helper.make_node("Cast", ["yc"], ["y"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, "qdq", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_validator_accepts_a_good_graph():
    assert validate_qdq(qdq_model()) == 3
    assert validate_qdq(qdq_model(scale_dtype=np.float16)) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"zero_point": 3}, "zero point 0"),
        ({"act_scale": -0.1}, "finite and positive"),
        ({"act_scale": [0.1, 0.2]}, "per-channel scales on activation"),
        ({"weight_axis": 1}, "needs the output-channel axis 0"),
        ({"scale_dtype": np.float16, "opset": 17}, "opset 19"),
        ({"with_q_zero_point": False}, "produces uint8"),
    ],
)
def test_validator_rejects_what_tensorrt_rejects(kwargs, message):
    with pytest.raises(GraphError, match=message) as info:
        validate_qdq(qdq_model(**kwargs))
    assert "node '" in str(info.value)  # the error names the node


def test_validator_rejects_a_computed_scale():
    model = qdq_model()
    scale = model.graph.initializer[0]
    model.graph.initializer.remove(scale)
    model.graph.input.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    with pytest.raises(GraphError, match="constant"):
        validate_qdq(model)
