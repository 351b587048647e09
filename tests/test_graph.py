"""Graph cleanup removes no-ops and folds constants without changing outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from trtopt.profiles import build_profiles
from trtopt.export import export
from trtopt.graph import cleanup, graph_input_shapes, save_model
from tests._models import MaskedEncoder, ResidualCNN, padding_mask


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def handmade() -> onnx.ModelProto:
    """x -> Identity -> Add(const folded from Mul(2, 3)) -> Dropout -> Relu -> y."""
    two = numpy_helper.from_array(np.full((4,), 2.0, np.float32), "two")
    three = numpy_helper.from_array(np.full((4,), 3.0, np.float32), "three")
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"], name="id"),
        helper.make_node("Mul", ["two", "three"], ["six"], name="const_mul"),
        helper.make_node("Add", ["x_id", "six"], ["added"], name="add"),
        helper.make_node("Dropout", ["added"], ["dropped"], name="dropout"),
        helper.make_node("Relu", ["dropped"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [two, three],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_cleanup_removes_noops_and_folds_constants():
    model = handmade()
    cleaned, report = cleanup(model)
    assert [n.op_type for n in cleaned.graph.node] == ["Add", "Relu"]
    assert set(report.removed_noops) == {"id", "dropout"}
    assert "const_mul" in report.folded
    assert (report.nodes_before, report.nodes_after) == (5, 2)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(cleaned, {"x": x})[0], run(model, {"x": x})[0])


def test_identity_feeding_a_graph_output_is_kept():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="id")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    cleaned, report = cleanup(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))
    assert [o.name for o in cleaned.graph.output] == ["y"]
    assert report.removed_noops == ()


@pytest.mark.parametrize("factory", ["cnn", pytest.param("encoder", marks=pytest.mark.slow)])
def test_cleanup_never_changes_exported_outputs(factory):
    torch.manual_seed(0)
    if factory == "cnn":
        model, names, args = ResidualCNN().eval(), ["x"], (torch.randn(2, 3, 16, 16),)
        spec = {"x": {0: (1, 2, 8)}}
    else:
        model, names = MaskedEncoder().eval(), ["tokens", "padding_mask"]
        args = (torch.randn(2, 10, 32), padding_mask(2, 10))
        spec = {"tokens": {0: (1, 2, 8)}, "padding_mask": {0: (1, 2, 8)}}
    profiles = build_profiles(spec, {n: tuple(a.shape) for n, a in zip(names, args)})
    exported = export(model, args, profiles, opset=19)
    cleaned, report = cleanup(exported.model)
    assert report.nodes_after <= report.nodes_before
    feeds = {n: a.numpy() for n, a in zip(names, (a[:1].repeat_interleave(5, 0) for a in args))}
    feeds[names[0]] = np.random.default_rng(1).normal(size=feeds[names[0]].shape).astype(np.float32)
    for before, after in zip(run(exported.model, feeds), run(cleaned, feeds)):
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    assert graph_input_shapes(cleaned)[names[0]][0] == f"{names[0]}_dim0"


def test_save_model_is_atomic(tmp_path):
    path = save_model(handmade(), tmp_path / "sub" / "m.onnx")
    assert onnx.load(path).graph.node[0].name == "id"
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]


def test_large_models_use_external_data(tmp_path, monkeypatch):
    import trtopt.graph as graph_module

    monkeypatch.setattr(graph_module, "EXTERNAL_DATA_THRESHOLD", 16)  # bytes, so the 32-byte weights count as large
    path = graph_module.save_model(handmade(), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").exists()
    reloaded = onnx.load(path)
    assert numpy_helper.to_array(reloaded.graph.initializer[0]).tolist() == [2.0] * 4
