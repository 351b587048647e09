"""``PrecisionReport``: the typed report reads every module file's JSON and writes it back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from tests.pinned_reports import FP16_REPORT, INT8_REPORT, PERCENTILE_FP32_REPORT
from trtopt.module import read_module_file
from trtopt.precision import PrecisionReport
from trtopt.precision.budget import BudgetReport
from trtopt.precision.readout import AccuracyReadout

OLD_FILE = Path(__file__).parent / "data" / "digits_int8_before_names.trtopt"


def round_trip(data: dict) -> dict:
    return PrecisionReport.from_json(json.loads(json.dumps(data))).to_json()


def test_reports_round_trip_with_their_key_order():
    for data in (INT8_REPORT, FP16_REPORT, PERCENTILE_FP32_REPORT, {}, {"precision": "int8", "from_graph": True, "qdq_nodes": 3}):
        again = round_trip(data)
        assert again == data and list(again) == list(data)


def test_an_old_module_files_report_round_trips():
    data = read_module_file(OLD_FILE)[1].info["precision"]
    report = PrecisionReport.from_json(data)
    assert report.precision == "int8" and report.qdq_nodes > 0
    assert report.to_json() == data and list(report.to_json()) == list(data)


def test_nested_reports_are_typed_and_unknown_keys_are_kept():
    budget = BudgetReport(budget="cosine >= 0.99", kept_high=["a/MatMul"], final=0.995, met=True)
    readout = AccuracyReadout(8, 0.999, 0.99, 0.01, 1.0, True)
    data = {"precision": "int8", "accuracy_budget": budget.to_json(), "accuracy": readout.to_json(), "from_the_future": [1]}
    report = PrecisionReport.from_json(data)
    assert report.accuracy_budget == budget and report.accuracy == readout
    assert report.extra == {"from_the_future": [1]} and report.to_json() == data
    assert PrecisionReport.from_json({}) == PrecisionReport() and PrecisionReport().precision is None


def test_budget_reports_with_unmeasured_figures_compare_equal():
    """NaN marks a figure the search did not measure; a report read back from JSON text holds NaN
    objects of its own, which the generated dataclass __eq__ found unequal (and 3.13's always does)."""
    import json

    budget = BudgetReport(budget="cosine >= 0.99", kept_high=["a/MatMul"], final=0.995, met=True)
    again = BudgetReport(**json.loads(json.dumps(budget.to_json())))
    assert again == budget
    assert again != BudgetReport(budget="cosine >= 0.99", kept_high=["a/MatMul"], final=0.996, met=True)
    assert again != BudgetReport(budget="cosine >= 0.99", kept_high=["a/MatMul"], final=float("nan"), met=True)
