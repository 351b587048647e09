"""Models that are FP16 or BF16 already (``model.half()``, an FP16 .onnx file) on the CPU backend.

Their graph inputs, weights and outputs are FP16 (or BF16); ONNX Runtime's CPU
provider lacks most FP16 kernels, so the emulation computes in FP32 and rounds,
keeping the graph's own input and output types.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import trtopt
from trtopt.executor import fp16_emulation
from tests._models import ResidualCNN


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return ResidualCNN().eval()


def images(seed: int, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


def worst_cosine(actual: np.ndarray, expected: np.ndarray) -> float:
    a, b = actual.astype(np.float64), expected.astype(np.float64)
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


# Rounding every FP16 tensor once, as torch's CPU FP16 kernels do, in another accumulation
# order: the results differ by a few FP16 ulps (2^-10 relative each) of the largest value.
FP16_TOLERANCE = 8 * 2.0**-10


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_half_torch_model_runs_with_fp16_io(precision: str, tmp_path) -> None:
    model = cnn().half()
    x = images(0).half()
    data = [(images(s).half(),) for s in range(1, 6)] if precision == "fp16" else None
    fast = trtopt.compile(model, (x,), precision=precision, calibration_data=data, backend="onnxruntime")
    y = fast(x)
    assert y.dtype == torch.float16
    with torch.no_grad():
        assert relative(y, model(x)) < FP16_TOLERANCE
    # numpy in, numpy out, FP16 as well (the call's fast path)
    assert fast(x.numpy()).dtype == np.float16
    loaded = trtopt.load(fast.save(tmp_path / "half.trtopt"), backend="onnxruntime")
    assert torch.equal(loaded(x), y)


def test_half_torch_model_quantizes_like_its_fp32_original() -> None:
    """INT8 of a model.half(): widened to FP32 (exact weights), quantized, FP16 I/O kept."""
    fp32 = cnn()
    half = copy.deepcopy(fp32).half()
    data = [images(s) for s in range(1, 11)]
    x = images(0)
    from_fp32 = trtopt.compile(fp32, (x,), precision="int8", calibration_data=[(d,) for d in data],
                               backend="onnxruntime")
    from_half = trtopt.compile(half, (x.half(),), precision="int8", calibration_data=[(d.half(),) for d in data],
                               backend="onnxruntime")
    y = from_half(x.half())
    assert y.dtype == torch.float16
    assert from_half.precision_report.quantized_units == from_fp32.precision_report.quantized_units
    # the same INT8 model but for the FP16 rounding of the calibration data and the output
    assert relative(y, from_fp32(x)) < 0.02


def fp16_onnx_file(path) -> onnx.ModelProto:
    """An FP16 MLP as a third party ships it: FP16 input, weights, Gemm/MatMul and output."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float16) / 4, "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(32).astype(np.float16), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float16) / 4, "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(8).astype(np.float16), "b2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "fp16_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 8])],
        [w1, b1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_fp16_onnx_file_matches_plain_onnxruntime(tmp_path, precision: str) -> None:
    path = tmp_path / "mlp16.onnx"
    fp16_onnx_file(path)
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float16)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    data = (
        [(np.random.default_rng(s).standard_normal((4, 16)).astype(np.float16),) for s in range(2, 12)]
        if precision == "int8" else None
    )
    fast = trtopt.compile(path, precision=precision, calibration_data=data, backend="onnxruntime",
                          dynamic_shapes={"x": {0: (1, 4, 8)}})
    y = fast(x)
    assert y.dtype == np.float16
    if precision == "fp32":  # plain ORT skips some of the FP16 rounding TensorRT (and the emulation) does
        error = float(np.abs(y.astype(np.float32) - expected.astype(np.float32)).max() / np.abs(expected).max())
        assert error < FP16_TOLERANCE, error
    else:
        assert worst_cosine(y, expected) > 0.99


def test_emulation_keeps_fp16_io_and_widening_is_exact(tmp_path) -> None:
    model = fp16_onnx_file(tmp_path / "mlp16.onnx")
    emulate, widen = fp16_emulation.emulate_fp16, fp16_emulation.widen_to_fp32
    for graph in (emulate(model), widen(model), emulate(widen(model))):
        onnx.checker.check_model(graph, full_check=True)
        assert graph.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
        assert graph.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
        assert all(t.data_type == TensorProto.FLOAT for t in graph.graph.initializer)
    widened = {t.name: numpy_helper.to_array(t) for t in widen(model).graph.initializer}
    for init in model.graph.initializer:
        assert np.array_equal(widened[init.name], numpy_helper.to_array(init).astype(np.float32))


def test_bfloat16_model_runs_at_fp32_and_says_what_to_do_otherwise() -> None:
    # an MLP: ONNX has BF16 MatMul/Gemm at opset 19, BF16 Conv only from opset 22
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval().bfloat16()
    x = torch.randn(4, 16).bfloat16()
    fast = trtopt.compile(model, (x,), backend="onnxruntime")
    y = fast(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        assert relative(y, model(x)) < 8 * 2.0**-7  # a few BF16 ulps
    with pytest.raises(trtopt.ConfigError, match=r"computes in BF16.*model\.float\(\)"):
        trtopt.compile(model, (x,), precision="int8", calibration_data=[(x,)] * 4, backend="onnxruntime")


def test_bfloat16_model_with_dynamic_shapes_is_checked_at_each_profile_shape() -> None:
    # The compile-time shape check feeds the BF16 examples, resized, to an FP32-emulating session.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval().bfloat16()
    x = torch.randn(4, 16).bfloat16()
    fast = trtopt.compile(model, (x,), dynamic_shapes={"input": {0: (1, 4, 8)}}, backend="onnxruntime")
    for batch in (1, 8):
        xb = torch.randn(batch, 16).bfloat16()
        with torch.no_grad():
            assert relative(fast(xb), model(xb)) < 8 * 2.0**-7


# ------------------------------------------------------------------ third-party ONNX at opset 17


def opset17_file_with_weight_casts(path) -> None:
    """What older TorchScript exporters write for a model saved in FP16 and run in FP32: opset 17,
    FP16 weight initializers each reaching its MatMul/Gemm through a Cast (and a Transpose)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((16, 32)) / 4).astype(np.float16), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((32, 8)) / 4).astype(np.float16), "w2")
    b1 = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1")
    nodes = [
        helper.make_node("Cast", ["w1"], ["w1_f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w1_f"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("Cast", ["w2"], ["w2_f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["w2_f"], ["w2_t"], perm=[1, 0]),
        helper.make_node("Gemm", ["r", "w2_t"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "encoder17",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [w1, w2, b1],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def test_opset17_file_with_weight_casts_quantizes_and_validates(tmp_path) -> None:
    """Before opset 19 a DequantizeLinear has no FP16 form: its consumer must stay FP32 rather
    than read it through a Cast (which validate_qdq, like TensorRT, refuses for per-channel weights)."""
    path = tmp_path / "encoder17.onnx"
    opset17_file_with_weight_casts(path)
    batches = [(np.random.default_rng(s).standard_normal((4, 16)).astype(np.float32),) for s in range(2, 12)]
    fast = trtopt.compile(path, precision="int8", calibration_data=batches, backend="onnxruntime",
                          dynamic_shapes={"x": {0: (1, 4, 8)}})
    report = fast.precision_report
    assert report.quantized_weights == 2 and report.float_precision == "fp16"
    assert trtopt.precision.validate_qdq(fast.onnx_model) == report.qdq_nodes
    producers = {out: n for n in fast.onnx_model.graph.node for out in n.output}
    for node in fast.onnx_model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            assert [producers[i].op_type for i in node.input[:2]] == ["DequantizeLinear"] * 2
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert worst_cosine(fast(x), expected) > 0.99


def with_fp16_weight_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each MatMul/Gemm weight stored in FP16 and cast to FP32 in front of its op, as exporters of
    models saved in half precision write it."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            weight = inits[node.input[1]]
            half = numpy_helper.from_array(numpy_helper.to_array(weight).astype(np.float16), weight.name + "_fp16")
            model.graph.initializer.append(half)
            cast_out = weight.name + "_cast"
            nodes.append(helper.make_node("Cast", [half.name], [cast_out], to=TensorProto.FLOAT))
            node.input[1] = cast_out
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_torchscript_opset17_encoder_with_weight_casts_quantizes(tmp_path) -> None:
    from tests._models import MaskedEncoder, padding_mask

    torch.manual_seed(0)
    encoder = MaskedEncoder().eval()
    path = tmp_path / "encoder17.onnx"
    torch.onnx.export(encoder, (torch.randn(2, 8, 32), padding_mask(2, 8)), str(path), opset_version=17,
                      dynamo=False, input_names=["tokens", "mask"], output_names=["y"],
                      dynamic_axes={"tokens": {0: "batch"}, "mask": {0: "batch"}})
    model = with_fp16_weight_casts(onnx.load(str(path)))
    assert sum(n.op_type == "Cast" for n in model.graph.node) >= 4
    onnx.save(model, str(path))
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((2, 8, 32)).astype(np.float32), padding_mask(2, 8).numpy()) for _ in range(10)]
    fast = trtopt.compile(path, precision="int8", calibration_data=batches, backend="onnxruntime",
                          dynamic_shapes={"tokens": {0: (1, 2, 4)}, "mask": {0: (1, 2, 4)}})
    assert fast.precision_report.quantized_weights >= 4
    assert trtopt.precision.validate_qdq(fast.onnx_model) == fast.precision_report.qdq_nodes
    tokens, mask = batches[0]
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"tokens": tokens, "mask": mask})[0]
    assert worst_cosine(fast(tokens, mask).reshape(-1, 8), expected.reshape(-1, 8)) > 0.98
