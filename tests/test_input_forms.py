"""Every model form compiles to the same outputs as the nn.Module path (issue 9)."""

from __future__ import annotations

import pytest
import torch

import trtopt
from tests._models import ResidualCNN, TwoInputsDictOut
from tests.helpers import max_relative_error

TOLERANCE = 1e-4
SHAPES = {"x": {0: (1, 4, 8)}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ResidualCNN().eval()


@pytest.fixture(scope="module")
def reference(model):
    return trtopt.compile(model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=SHAPES, backend="onnxruntime")


def check_same(compiled, model):
    for batch in (1, 3, 8):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            expected = model(x)
        assert max_relative_error(compiled(x), expected) <= TOLERANCE


def test_nn_module(reference, model):
    check_same(reference, model)


@pytest.mark.parametrize("how", ["traced", "scripted"])
def test_torchscript_module_and_its_archive(model, how, tmp_path):
    x = torch.randn(2, 3, 16, 16)
    script = torch.jit.trace(model, (x,)) if how == "traced" else torch.jit.script(model)
    check_same(trtopt.compile(script, (x,), dynamic_shapes=SHAPES, backend="onnxruntime"), model)
    torch.jit.save(script, tmp_path / "model.pt")
    from_file = trtopt.compile(str(tmp_path / "model.pt"), (x,), dynamic_shapes=SHAPES, backend="onnxruntime")
    assert from_file.spec.info["exporter"] == "torchscript"
    check_same(from_file, model)


def test_exported_program_and_its_file(model, tmp_path):
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=8)}})
    check_same(trtopt.compile(program, (x,), dynamic_shapes=SHAPES, backend="onnxruntime"), model)
    torch.export.save(program, tmp_path / "model.pt2")
    # The program's own example inputs stand in when none are given.
    check_same(trtopt.compile(tmp_path / "model.pt2", dynamic_shapes=SHAPES, backend="onnxruntime"), model)


def test_onnx_model_and_path(reference, model, tmp_path):
    from trtopt.graph import save_model

    path = save_model(reference.onnx_model, tmp_path / "model.onnx")
    from_path = trtopt.compile(path, dynamic_shapes=SHAPES, backend="onnxruntime")
    assert from_path.spec.info["exporter"] == "onnx"
    check_same(from_path, model)
    check_same(trtopt.compile(reference.onnx_model, dynamic_shapes=SHAPES, backend="onnxruntime"), model)


def test_onnx_with_several_outputs_returns_a_tuple(tmp_path):
    torch.manual_seed(0)
    compiled = trtopt.compile(TwoInputsDictOut().eval(), (torch.randn(2, 6), torch.randn(2, 3)))
    again = trtopt.compile(compiled.onnx_model)
    out = again(torch.ones(2, 6), torch.ones(2, 3))
    assert isinstance(out, tuple) and len(out) == 3
    assert torch.equal(out[0], compiled(torch.ones(2, 6), torch.ones(2, 3))["joint"])


def test_onnx_dynamic_dim_without_a_range_says_how_to_fix(reference):
    with pytest.raises(trtopt.ConfigError, match=r"'x' dimension 0 is dynamic.*add it to dynamic_shapes"):
        trtopt.compile(reference.onnx_model)


def test_unsupported_forms_name_the_supported_ones(tmp_path):
    with pytest.raises(trtopt.InputError, match="torch.nn.Module, a TorchScript module"):
        trtopt.compile(lambda x: x, (torch.randn(2),))
    (tmp_path / "weights.pt").write_bytes(b"not an archive")
    with pytest.raises(trtopt.InputError, match="not a torch.jit.save archive.*state_dict"):
        trtopt.compile(tmp_path / "weights.pt", (torch.randn(2),))
    with pytest.raises(trtopt.InputError, match="does not exist"):
        trtopt.compile(tmp_path / "missing.onnx")
    with pytest.raises(trtopt.InputError, match="example_inputs is required"):
        trtopt.compile(ResidualCNN())


def test_a_corrupt_onnx_file_is_a_graph_error_naming_it(tmp_path):
    """Issue 15: trtopt.compile on a corrupt .onnx raised protobuf's DecodeError."""
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(b"\x08\x07\x12\xff\xff\xff not protobuf")
    with pytest.raises(trtopt.GraphError, match=r"truncated\.onnx is not a readable ONNX model"):
        trtopt.compile(str(bad), backend="onnxruntime")
