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
        "--models", "resnet18", "--precisions", "fp32,int8,fp8", "--image-size", "32", "--batch-sizes", "1,2",
        "--iterations", "2", "--warmup", "1", "--eval-samples", "4", "--calib-samples", "4",
        "--backend", "onnxruntime", "--device", "cpu", "--out", str(tmp_path), "-q",
    ])
    assert code == 0
    report = bench.BenchReport.from_json(json.loads((tmp_path / "compare_precisions.json").read_text()))
    rows = [(r.runtime, r.precision, r.status) for r in report.results]
    assert rows == [("torch-eager", "fp32", "ok"), ("trtopt", "fp32", "ok"), ("trtopt", "int8", "ok"), ("trtopt", "fp8", "ok")]
    assert all([s.batch_size for s in r.latency] == [1, 2] for r in report.results)
    assert report.results[1].accuracy.samples == 4 and report.results[1].accuracy.top1_agreement == 1.0
    assert report.settings["command"].startswith("python benchmarks/compare_precisions.py")
    table = (tmp_path / "compare_precisions.md").read_text()
    assert "| resnet18 | trtopt | int8 | onnxruntime |" in table and table in capsys.readouterr().out
    assert "| resnet18 | trtopt | fp8 | onnxruntime |" in table
    assert (tmp_path / "compare_precisions.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv", [["--models", "resnet9"], ["--batch-sizes", "0"], ["--models", "vit_b_16", "--image-size", "100"]]
)
def test_bad_options_are_usage_errors(script, argv):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
