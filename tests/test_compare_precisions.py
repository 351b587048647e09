"""benchmarks/compare_precisions.py runs end to end on a tiny setting and writes its three files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from trtopt import bench

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_precisions.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_precisions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_run_writes_json_table_and_plot(script, tmp_path, capsys):
    code = script.main([
        "--models", "digits_cnn,resnet18", "--precisions", "fp32,int8,fp8", "--image-size", "32",
        "--batch-sizes", "1,2", "--iterations", "2", "--warmup", "1", "--calib-samples", "4", "--threads", "1",
        "--backend", "onnxruntime", "--device", "cpu", "--out", str(tmp_path), "-q",
    ])
    assert code == 0
    report = bench.BenchReport.from_json(json.loads((tmp_path / "compare_precisions.json").read_text()))
    rows = [(r.model, r.runtime, r.precision, r.status) for r in report.results]
    digits, resnet = "digits_cnn (trained)", "resnet18 (random weights, latency only)"
    assert rows == [(m, rt, p, "ok") for m in (digits, resnet)
                    for rt, p in [("torch-eager", "fp32"), ("trtopt", "fp32"), ("trtopt", "int8"), ("trtopt", "fp8")]]
    assert all([s.batch_size for s in r.latency] == [1, 2] and r.threads == 1 for r in report.results)
    # Accuracy only where the weights mean something: the trained CNN on its 500 held-out images.
    trained = [r for r in report.results if r.model == digits and r.runtime == "trtopt"]
    assert all(r.accuracy.samples == 500 and r.accuracy.top1_agreement > 0.9 for r in trained)
    assert all(r.accuracy is None for r in report.results if r.model == resnet)
    assert "held-out test images" in report.settings["weights"][digits]
    assert report.settings["command"].startswith("python benchmarks/compare_precisions.py")
    table = (tmp_path / "compare_precisions.md").read_text()
    assert f"| {digits} | trtopt | int8 | onnxruntime |" in table and table in capsys.readouterr().out
    assert f"| {resnet} | trtopt | fp8 | onnxruntime |" in table
    assert "Weights and data:" in table and "shared with other jobs" in table
    assert (tmp_path / "compare_precisions.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv", [["--models", "resnet9"], ["--batch-sizes", "0"], ["--models", "vit_b_16", "--image-size", "100"]]
)
def test_bad_options_are_usage_errors(script, argv):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
