"""Behaviour pinned before the executor and precision-pipeline refactor (issue 16).

A fixed seeded model and fixed calibration data; the expected values were computed
with the code as it was before the refactor and written as literals in tests/pinned_reports.py. The probe
ranges, every calibrated INT8 range, the FP16 keep-list and the whole precision
report written into module files (values and key order) must not move.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import trtopt
from tests._models import ResidualCNN
from tests.pinned_reports import FP16_REPORT, INT8_REPORT, PERCENTILE_FP32_REPORT, RANGES
from trtopt.spec import tensor_specs
from trtopt.precision import feed_batches, tensor_ranges

# Every float here is measured on ONNX Runtime's outputs, except the input's plain max (compared
# exactly below). ONNX Runtime's float kernels (MLAS) take another code path per ISA (AVX2,
# AVX-512, VNNI, AMX) and per thread split, and sum in another order there: each conv output moves
# by a few float32 ulps (1.2e-7) per tap, and these convs sum 144 taps over 3 layers (seen: 8e-6 on
# an AVX-512 VNNI CPU, where 1e-6 failed). Ranges follow their tensor's max through the histogram,
# and the readout its outputs. 1e-4 bounds that with margin, and stays far below what a change of
# behaviour moves (another calibrator, SmoothQuant or float part moves these values by 1e-3 to 1e-1).
RELATIVE = 1e-4


def seeded_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return ResidualCNN().eval()


def calibration_batches() -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    return [torch.from_numpy(rng.standard_normal((4, 3, 16, 16)).astype(np.float32) * 3) for _ in range(10)]


def compile_seeded(precision: str, **settings: object) -> trtopt.CompiledModule:
    data = calibration_batches()
    return trtopt.compile(seeded_model(), (data[0],), precision=precision, backend="onnxruntime",
                          calibration_data=None if precision == "fp32" else data, **settings)


def saved_report(module: trtopt.CompiledModule, tmp_path) -> dict:
    """The precision report as the module file holds it (JSON, in its key order)."""
    path = module.save(tmp_path / "m.trtopt")
    report = json.loads(json.dumps(trtopt.load(path, backend="onnxruntime").spec.info["precision"]))
    report.pop("calibration_seconds", None)  # wall-clock time: the one value that is not reproducible
    return report


def assert_same(actual: object, expected: object, where: str = "report") -> None:
    """Equal structure and key order; floats equal to RELATIVE."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert isinstance(actual, float), where
        assert actual == pytest.approx(expected, rel=RELATIVE, abs=1e-12) or (math.isnan(actual) and math.isnan(expected)), where
    else:
        assert actual == expected and type(actual) is type(expected), f"{where}: {actual!r} != {expected!r}"


def test_probe_ranges_are_pinned() -> None:
    graph = compile_seeded("fp32").onnx_model
    _, batches = feed_batches(calibration_batches(), tensor_specs(graph.graph.input))
    ranges = tensor_ranges(graph, batches())
    assert_same(ranges, RANGES, "ranges")
    # the input's range is max |x| over the data: no kernel or summation order in it, so exact
    assert ranges["x"] == RANGES["x"] == float(np.abs(np.stack(calibration_batches())).max())


def test_int8_report_and_ranges_are_pinned(tmp_path) -> None:
    assert_same(saved_report(compile_seeded("int8"), tmp_path), INT8_REPORT)


def test_int8_percentile_fp32_float_part_is_pinned(tmp_path) -> None:
    module = compile_seeded("int8", calibrator="percentile", int8_float_precision="fp32", smoothquant=None)
    assert_same(saved_report(module, tmp_path), PERCENTILE_FP32_REPORT)


def test_fp16_keep_list_is_pinned(tmp_path) -> None:
    assert_same(saved_report(compile_seeded("fp16", fp16_threshold=8.0), tmp_path), FP16_REPORT)


def test_fp32_and_carried_reports_are_pinned(tmp_path) -> None:
    assert saved_report(compile_seeded("fp32"), tmp_path) == {}
    carried = trtopt.compile(compile_seeded("int8").onnx_model, backend="onnxruntime")
    assert_same(saved_report(carried, tmp_path), {"precision": "int8", "from_graph": True, "qdq_nodes": 12})

