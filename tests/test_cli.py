"""The ``trtopt`` command line, in process through ``trtopt.cli.main`` plus a subprocess smoke test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trtopt
from tests.helpers import FACTORY, assert_one_line_error, run_cli
from trtopt import ConfigError, bench, cli

REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def factory(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("factory") / "models.py"
    path.write_text(FACTORY)
    return f"{path}:make"


@pytest.fixture(scope="module")
def compiled(factory, tmp_path_factory) -> Path:
    """One module compiled through the CLI with a dynamic batch 1..4, shared by the tests below."""
    out = tmp_path_factory.mktemp("compiled") / "small.trtopt"
    code = cli.main(["-q", "compile", factory, "--shapes", "x:1x3x8x8,2x3x8x8,4x3x8x8",
                     "--backend", "onnxruntime", "-o", str(out)])
    assert code == 0
    return out


# ------------------------------------------------------------------ help


@pytest.mark.slow
def test_help_in_a_subprocess():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "trtopt.cli", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("compile", "bench", "inspect", "export-triton"):
        assert command in proc.stdout


def test_python_dash_m_trtopt(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["trtopt", "--version"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("trtopt", run_name="__main__")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("trtopt ")


def test_subcommand_help_documents_shapes(capsys):
    code, out, _ = run_cli(capsys, "compile", "--help")
    assert code == 0
    assert "NAME:MIN,OPT,MAX" in out and "k-th --shapes belongs to profile k" in out


def test_usage_errors_exit_2(capsys):
    assert run_cli(capsys, "compile", "m.onnx", "--precision", "fp64")[0] == 2
    assert run_cli(capsys)[0] == 2  # no subcommand
    assert run_cli(capsys, "bench", "m.trtopt", "--batch-sizes", "0,x")[0] == 2


# ---------------------------------------------------------------- shapes


def test_parse_shape_option():
    assert cli.parse_shape_option("x:1x3x224x224,8x3x224x224,32x3x224x224") == (
        "x", ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    )
    assert cli.parse_shape_option("input:0:1x4") == ("input:0", ((1, 4),) * 3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("1x3x224x224", "NAME:MIN,OPT,MAX"),
        ("x:1x3,2x3", "gives 2 shapes"),
        ("x:1x3,2x3x4,4x3", "same rank"),
        ("x:1xAx3", "not a shape"),
        ("x:0x3", "not a shape"),
        ("x:", "not a shape"),
    ],
)
def test_parse_shape_option_rejects(text, message):
    with pytest.raises(ConfigError, match=message):
        cli.parse_shape_option(text)


def test_shapes_to_profiles_groups_repeats_into_profiles():
    profiles = cli.shapes_to_profiles(["x:1x3,2x3,4x3", "m:1x5", "x:5x3,8x3,16x3"])
    assert len(profiles) == 2
    assert profiles[0]["x"] == ((1, 3), (2, 3), (4, 3)) and profiles[1]["x"] == ((5, 3), (8, 3), (16, 3))
    assert profiles[0]["m"] == profiles[1]["m"] == ((1, 5),) * 3
    with pytest.raises(ConfigError, match="once .* or 3 times"):
        cli.shapes_to_profiles(["x:1x3", "x:2x3", "x:3x3", "m:1x5", "m:2x5"])


def test_dynamic_shapes_from_profiles():
    reference = {"x": [2, 3, 224, 224]}
    one = cli.shapes_to_profiles(["x:1x3x224x224,8x3x224x224,32x3x224x224"])
    assert cli.dynamic_shapes_from_profiles(one, reference, "model") == {"x": {0: (1, 8, 32)}}
    two = cli.shapes_to_profiles(["x:1x3x224x224,2x3x224x224,4x3x224x224", "x:8x3x224x224,8x3x224x224,8x3x224x224"])
    # Batch is dynamic in profile 0, so profile 1 gets a (fixed) range for it too.
    assert cli.dynamic_shapes_from_profiles(two, reference, "model") == [
        {"x": {0: (1, 2, 4)}},
        {"x": {0: (8, 8, 8)}},
    ]
    # A symbolic dim in an ONNX file is dynamic even when MIN = MAX.
    assert cli.dynamic_shapes_from_profiles(
        cli.shapes_to_profiles(["x:4x3x224x224"]), {"x": ["N", 3, 224, 224]}, "ONNX file"
    ) == {"x": {0: (4, 4, 4)}}
    with pytest.raises(ConfigError, match="inputs \\['x'\\]"):
        cli.dynamic_shapes_from_profiles(cli.shapes_to_profiles(["y:1x3"]), reference, "model")
    with pytest.raises(ConfigError, match="rank 2"):
        cli.dynamic_shapes_from_profiles(cli.shapes_to_profiles(["x:1x3"]), reference, "model")
    with pytest.raises(ConfigError, match="dim 2 at 256"):
        cli.dynamic_shapes_from_profiles(cli.shapes_to_profiles(["x:2x3x256x224"]), reference, "model")


# --------------------------------------------------------------- compile


def test_compile_from_a_factory(compiled, capsys):
    code, out, _ = run_cli(capsys, "inspect", compiled, "--json")
    assert code == 0
    desc = json.loads(out)
    assert desc["precision"] == "fp32"
    assert desc["inputs"][0]["name"] == "x" and isinstance(desc["inputs"][0]["shape"][0], str)
    assert desc["profiles"][0]["x"] == {"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [4, 3, 8, 8], "dynamic": [0]}


def test_compile_bad_input_gives_one_line_errors(factory, tmp_path, capsys):
    path = factory.rpartition(":")[0]
    cases = [
        (["compile", tmp_path / "missing.onnx"], "does not exist"),
        (["compile", "no_such_module_xyz:make"], "cannot import 'no_such_module_xyz'"),
        (["compile", f"{path}:nothing"], "no function 'nothing'"),
        (["compile", f"{path}:make_wrong"], "must return (model, example_inputs)"),
        (["compile", "model.txt"], "neither a model file (.onnx, .pt2, .pt) nor a MODULE:FUNCTION"),
        (["compile", factory, "--shapes", "x:1x3x9x8,2x3x9x8,4x3x9x8"], "dim 2 at 9"),
        (["compile", factory, "--shapes", "x:4x3x8x8,2x3x8x8,1x3x8x8"], "min <= opt <= max"),
        (["compile", factory, "--calib", tmp_path / "none.npz", "--precision", "int8"], "calibration file"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, message)


def test_compile_from_an_onnx_file(compiled, tmp_path, capsys):
    import trtopt
    from trtopt.graph import save_model

    onnx_path = save_model(trtopt.load(compiled).onnx_model, tmp_path / "small.onnx")
    out = tmp_path / "from_onnx.trtopt"
    code, stdout, err = run_cli(capsys, "compile", onnx_path, "--shapes", "x:1x3x8x8,2x3x8x8,4x3x8x8",
                                "--backend", "onnxruntime", "-o", out)
    assert code == 0, err
    assert stdout.strip() == str(out)
    assert f"trtopt: compiling {onnx_path} at fp32" in err  # progress on stderr at the default verbosity
    code, _, err = run_cli(capsys, "-q", "compile", onnx_path, "--shapes", "x:1x3x8x8,2x3x8x8,4x3x8x8",
                           "--backend", "onnxruntime", "-o", out)
    assert code == 0 and "compiling" not in err
    assert trtopt.load(out).profiles[0]["x"].max == (4, 3, 8, 8)


def test_compile_int8_with_calibration_file(factory, tmp_path, capsys):
    import numpy as np

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((3, 2, 3, 8, 8)).astype(np.float32))  # 3 batches
    out = tmp_path / "int8.trtopt"
    code, _, err = run_cli(capsys, "compile", factory, "--precision", "int8", "--calib", calib,
                           "--calibrator", "minmax", "--calib-batches", "2", "--backend", "onnxruntime", "-o", out)
    assert code == 0, err
    code, stdout, _ = run_cli(capsys, "inspect", out, "--json")
    desc = json.loads(stdout)
    assert desc["precision"] == "int8" and desc["graph"]["quantize_dequantize_nodes"] > 0
    assert "int8" in desc["graph"]["weight_bytes_by_dtype"]
    precision = desc["info"]["precision"]
    # 2 batches calibrate (--calib-batches), the third is held back to measure the module against FP32.
    assert precision["calibration_batches"] == 2 and precision["accuracy"]["samples"] == 2
    # every range is checked, the smoothed ones too (calibrated by --calibrator since issue 23)
    assert set(precision["range_checks"]) == set(precision["activation_amax"])
    assert precision["smoothquant"]["calibrator"] == "minmax"
    code, text, _ = run_cli(capsys, "inspect", out)
    assert "  accuracy: cosine " in text and "held-back samples" in text
    assert "ranges checked; worst: " in text and "(error " in text
    assert "  smoothquant: alpha 0.85: 1 activation(s) smoothed" in text


def test_compile_the_cpu_layout_and_inspect_shows_it(factory, tmp_path, capsys):
    import numpy as np

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((3, 2, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "cpu.trtopt"
    code, _, err = run_cli(capsys, "compile", factory, "--precision", "int8", "--calib", calib,
                           "--int8-layout", "cpu", "-o", out)
    assert code == 0, err
    code, text, _ = run_cli(capsys, "inspect", out)
    assert "  int8_layout: cpu" in text and "  float_precision: fp32" in text
    code, _, err = run_cli(capsys, "compile", factory, "--precision", "int8", "--calib", calib,
                           "--int8-layout", "cpu", "--backend", "tensorrt", "-o", out)
    assert_one_line_error(code, err, "TensorRT cannot build")


def test_compile_smoothquant_and_calibrator_flags(factory, tmp_path, capsys):
    import numpy as np

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((3, 2, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "off.trtopt"
    code, _, err = run_cli(capsys, "compile", factory, "--precision", "int8", "--calib", calib, "--smoothquant", "off",
                           "--calibrator", "auto", "--backend", "onnxruntime", "-o", out)
    assert code == 0, err
    precision = trtopt.load(out).precision_report
    assert precision.smoothquant is None and precision.calibrator == "auto"
    assert {c["method"].split(":")[0] for c in precision.range_checks.values()} == {"auto"}
    code, _, err = run_cli(capsys, "compile", factory, "--precision", "int8", "--calib", calib, "--smoothquant", "2")
    assert code == 2 and "between 0 and 1" in err
    code, _, err = run_cli(capsys, "compile", factory, "--validation", calib, "--backend", "onnxruntime")
    assert_one_line_error(code, err, "not used at fp32")


def test_compile_with_an_accuracy_budget_and_emit_onnx(factory, tmp_path, capsys):
    import numpy as np

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((5, 2, 3, 8, 8)).astype(np.float32))
    out, onnx_path = tmp_path / "budget.trtopt", tmp_path / "deploy" / "small.onnx"
    code, _, err = run_cli(capsys, "compile", factory, "--precision", "int8", "--calib", calib,
                           "--accuracy-budget", "cosine>=0.99", "--emit-onnx", onnx_path,
                           "--shapes", "x:1x3x8x8,2x3x8x8,4x3x8x8", "--backend", "onnxruntime", "-o", out)
    assert code == 0, err
    assert "Accuracy budget: cosine >= 0.99" in err
    report = trtopt.load(out).precision_report.accuracy_budget
    assert report.met and report.final >= 0.99
    for suffix in (".onnx", ".json", ".build.sh", ".calib.cache"):
        assert onnx_path.with_suffix(suffix).is_file()
    assert "--minShapes=x:1x3x8x8" in onnx_path.with_suffix(".build.sh").read_text()


def test_compile_budget_errors_are_one_line(factory, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compile", factory, "--accuracy-budget", "cosine<=0.9", "--backend", "onnxruntime")
    assert_one_line_error(code, err, "higher-is-better")
    code, _, err = run_cli(capsys, "compile", factory, "--accuracy-budget", "cosine>=0.9", "--backend", "onnxruntime")
    assert_one_line_error(code, err, "accuracy_budget applies to precision='int8'")


# ----------------------------------------------------------------- bench


def test_bench_a_saved_module(compiled, tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    code, out, _ = run_cli(capsys, "bench", compiled, "--batch-sizes", "1,4", "--iterations", "3",
                           "--warmup", "1", "--backend", "onnxruntime", "--json", report_path)
    assert code == 0
    assert "| small | trtopt | fp32 | onnxruntime |" in out
    report = bench.BenchReport.from_json(json.loads(report_path.read_text()))
    (row,) = report.results
    assert [s.batch_size for s in row.latency] == [1, 4] and row.latency[0].iterations == 3
    assert row.artifact_bytes == compiled.stat().st_size


def test_bench_a_factory_against_torch(factory, tmp_path, capsys):
    import numpy as np

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((2, 2, 3, 8, 8)).astype(np.float32))
    code, out, _ = run_cli(capsys, "-q", "bench", factory, "--batch-sizes", "1,2", "--iterations", "2",
                           "--warmup", "1", "--precision", "fp32,int8", "--calib", calib,
                           "--backend", "onnxruntime", "--json", "-")
    assert code == 0
    data = json.loads(out[out.index("{"):])
    rows = {(r["runtime"], r["precision"]): r for r in data["results"]}
    assert set(rows) == {("torch-eager", "fp32"), ("trtopt", "fp32"), ("trtopt", "int8")}
    assert all(r["status"] == "ok" and [s["batch_size"] for s in r["latency"]] == [1, 2] for r in rows.values())
    assert rows[("trtopt", "fp32")]["accuracy"]["max_abs_error"] < 1e-4
    assert rows[("trtopt", "int8")]["accuracy"]["cosine_similarity"] > 0.9


def test_bench_bad_input(compiled, tmp_path, capsys):
    code, _, err = run_cli(capsys, "bench", compiled, "--batch-sizes", "8", "--iterations", "1",
                           "--warmup", "1", "--backend", "onnxruntime")
    assert_one_line_error(code, err, "dimension 0 is 8", "1..4")
    code, _, err = run_cli(capsys, "bench", tmp_path / "model.onnx")
    assert_one_line_error(code, err, "compile", "first")
    code, _, err = run_cli(capsys, "bench", tmp_path / "missing.trtopt")
    assert_one_line_error(code, err, "does not exist")


def test_bench_a_failed_row_exits_1(factory, capsys):
    code, out, err = run_cli(capsys, "bench", factory, "--precision", "int8", "--iterations", "1",
                             "--warmup", "1", "--backend", "onnxruntime")
    assert_one_line_error(code, err, "1 of 2 variants failed")
    assert "failed [1]" in out and "needs activation ranges" in out


# --------------------------------------------------------------- inspect


def test_inspect_text(compiled, capsys):
    code, out, _ = run_cli(capsys, "inspect", compiled)
    assert code == 0
    assert "precision fp32" in out and "no TensorRT engine" in out
    assert "  x: float32 [x_dim0, 3, 8, 8]" in out
    assert "[0] x: min 1x3x8x8  opt 2x3x8x8  max 4x3x8x8" in out
    assert "Quantize/DequantizeLinear" in out and "float32" in out


def test_inspect_bad_file(tmp_path, capsys):
    junk = tmp_path / "junk.trtopt"
    junk.write_bytes(b"not a zip file")
    code, _, err = run_cli(capsys, "inspect", junk)
    assert_one_line_error(code, err, "not a trtopt module file")


# --------------------------------------------------------- export-triton


def test_export_triton(compiled, tmp_path, capsys):
    repo = tmp_path / "repo"
    code, out, err = run_cli(capsys, "export-triton", compiled, repo, "--name", "small", "--backend", "onnxruntime")
    assert code == 0, err
    assert out.strip() == str(repo / "small")
    config = (repo / "small" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 4" in config  # the profile's max
    assert (repo / "small" / "1" / "model.onnx").is_file()
    code, _, err = run_cli(capsys, "export-triton", compiled, repo, "--name", "small")
    assert_one_line_error(code, err, "overwrite")
    code, _, err = run_cli(capsys, "export-triton", compiled, repo, "--name", "small", "--overwrite",
                           "--max-batch-size", "2", "--no-dynamic-batching")
    assert code == 0, err
    config = (repo / "small" / "config.pbtxt").read_text()
    assert "max_batch_size: 2" in config and "dynamic_batching" not in config
    code, _, err = run_cli(capsys, "export-triton", tmp_path / "missing.trtopt", repo, "--name", "x")
    assert_one_line_error(code, err, "does not exist")


def test_export_triton_python_flavour(compiled, tmp_path, capsys):
    repo = tmp_path / "repo"
    code, out, err = run_cli(capsys, "export-triton", compiled, repo, "--name", "small", "--flavour", "python")
    assert code == 0, err
    assert 'backend: "python"' in (repo / "small" / "config.pbtxt").read_text()
    assert (repo / "small" / "1" / "model.trtopt").is_file() and (repo / "small" / "1" / "model.py").is_file()


@pytest.mark.parametrize("shapes", [(), ("--shapes", "x:1x3x8x8")])
def test_compile_a_corrupt_onnx_file_names_it(tmp_path, capsys, shapes):
    """Issue 15: a corrupt ONNX file ended in protobuf's DecodeError traceback."""
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07\x12\xff\xff\xff not protobuf")
    code, _, err = run_cli(capsys, "compile", bad, *shapes, "--backend", "onnxruntime", "-o", tmp_path / "o.trtopt")
    assert_one_line_error(code, err, str(bad), "not a readable ONNX model")
    assert "Traceback" not in err
