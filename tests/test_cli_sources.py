"""The command line takes the model files the Python API takes, and its errors say what to type.

TorchScript (.pt) and torch.export (.pt2) files compile; a factory that raises, a
module file benched at another precision, an existing Triton version and an ONNX
file passed to inspect each get one line naming the fix; a module file written by
a newer trtopt loads with a warning.
"""

from __future__ import annotations

import json
import logging
import zipfile

import pytest
import torch

import trtopt
from tests.helpers import FACTORY, assert_one_line_error, run_cli

RAISING = FACTORY + "\n\ndef make_broken():\n    raise ValueError('weights file missing: /data/w.bin')\n"


@pytest.fixture(scope="module")
def factory_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("factory") / "models.py"
    path.write_text(RAISING)
    return path


@pytest.fixture(scope="module")
def small(factory_path):
    from trtopt.cli import load_factory

    return load_factory(f"{factory_path}:make")


@pytest.fixture(scope="module")
def module_file(small, tmp_path_factory):
    model, examples = small
    path = tmp_path_factory.mktemp("module") / "small.trtopt"
    trtopt.compile(model, examples, backend="onnxruntime", dynamic_shapes={"x": {0: (1, 2, 4)}}).save(path)
    return path


def test_compile_a_torchscript_file_with_its_shapes(small, tmp_path, capsys):
    model, (x,) = small
    path = tmp_path / "small.pt"
    torch.jit.trace(model, x).save(str(path))
    out = tmp_path / "from_pt.trtopt"
    code, stdout, err = run_cli(capsys, "-q", "compile", path, "--shapes", "x:1x3x8x8,2x3x8x8,4x3x8x8",
                                "--backend", "onnxruntime", "-o", out)
    assert code == 0, err
    module = trtopt.load(out)
    assert module.profiles[0]["x"].max == (4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=1e-4, atol=1e-5)
    code, _, err = run_cli(capsys, "compile", path, "--backend", "onnxruntime", "-o", out)
    assert_one_line_error(code, err, "TorchScript archive", "give --shapes for 'x'", "--shapes x:")


def test_compile_a_torch_export_file(small, tmp_path, capsys):
    model, (x,) = small
    path = tmp_path / "small.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    out = tmp_path / "from_pt2.trtopt"
    code, _, err = run_cli(capsys, "-q", "compile", path, "--backend", "onnxruntime", "-o", out)
    assert code == 0, err
    with torch.no_grad():
        torch.testing.assert_close(trtopt.load(out)(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_factory_that_raises_is_one_line(factory_path, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compile", f"{factory_path}:make_broken", "-o", tmp_path / "x.trtopt")
    assert_one_line_error(code, err, "make_broken' raised ValueError: weights file missing: /data/w.bin", "-v")
    assert "Traceback" not in err
    code, _, err = run_cli(capsys, "-v", "compile", f"{factory_path}:make_broken", "-o", tmp_path / "x.trtopt")
    assert code == 1 and "Traceback" in err and "in make_broken" in err  # -v: where the user's code raised
    broken_module = tmp_path / "broken.py"
    broken_module.write_text("import torch\nraise RuntimeError('no GPU here')\ndef make(): pass\n")
    code, _, err = run_cli(capsys, "compile", f"{broken_module}:make")
    assert_one_line_error(code, err, "raised RuntimeError: no GPU here")
    assert "Traceback" not in err


def test_bench_a_module_file_at_another_precision_is_an_error(module_file, capsys):
    code, out, err = run_cli(capsys, "bench", module_file, "--precision", "int8", "--iterations", "1",
                             "--warmup", "1", "--backend", "onnxruntime")
    assert_one_line_error(code, err, "--precision int8 applies to a factory", "already compiled at fp32",
                          "trtopt compile")
    assert out == ""


def test_export_triton_names_the_overwrite_option(module_file, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert run_cli(capsys, "-q", "export-triton", module_file, repo, "--name", "small", "--backend", "onnxruntime")[0] == 0
    code, _, err = run_cli(capsys, "export-triton", module_file, repo, "--name", "small")
    assert_one_line_error(code, err, "already exists; pass --overwrite", "--version 2")
    assert "overwrite=True" not in err


@pytest.mark.parametrize("name, kind", [("model.onnx", "an ONNX file"), ("model.pt2", "a PyTorch model file")])
def test_inspect_a_model_file_says_what_it_is(tmp_path, capsys, name, kind):
    path = tmp_path / name
    path.write_bytes(b"\x08\x07")
    code, _, err = run_cli(capsys, "inspect", path)
    assert_one_line_error(code, err, f"is {kind}, not a trtopt module file", f"trtopt compile {path}")
    assert "corrupt" not in err


def test_a_module_file_from_a_newer_trtopt_loads_with_a_warning(module_file, tmp_path, caplog):
    newer = tmp_path / "newer.trtopt"
    with zipfile.ZipFile(module_file) as source, zipfile.ZipFile(newer, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "manifest.json":
                manifest = json.loads(data)
                manifest["trtopt_version"] = "99.1.0"
                data = json.dumps(manifest).encode()
            target.writestr(item, data)
    with caplog.at_level(logging.WARNING, logger="trtopt"):
        trtopt.load(module_file)
        assert not [r for r in caplog.records if "newer" in r.getMessage()]
        module = trtopt.load(newer)
    (record,) = [r for r in caplog.records if "newer" in r.getMessage()]
    assert "trtopt 99.1.0" in record.getMessage() and trtopt.__version__ in record.getMessage()
    assert module(torch.randn(2, 3, 8, 8)).shape == (2, 3)
