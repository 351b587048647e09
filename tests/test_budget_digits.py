"""compile(accuracy_budget=...) on the trained digits CNN (issue 8)."""

from __future__ import annotations

import pytest
import torch

import trtopt
from trtopt.bench.digits import top1


@pytest.fixture(scope="module")
def trained(digits, digits_cnn):
    return digits, digits_cnn


VALIDATION = 250  # the test set's first half judges the budget, the second half the result


def compile_with(trained, budget, tmp_path):
    digits, model = trained
    # Calibrate on training images; judge the budget on the first half of the held-out set.
    calibration = list(torch.split(digits.train_x[:256], 64))
    validation = list(zip(torch.split(digits.test_x[:VALIDATION], 125), torch.split(digits.test_y[:VALIDATION], 125)))
    return trtopt.compile(
        model, (digits.train_x[:2],), precision="int8", calibration_data=calibration, validation_data=validation,
        accuracy_budget=budget, dynamic_shapes={"x": {0: (1, 64, 512)}},
        sensitivity_cache_dir=str(tmp_path), backend="onnxruntime",
    )


def test_a_tight_budget_is_met_by_keeping_few_units_high(trained, tmp_path):
    digits, model = trained
    compiled = compile_with(trained, "cosine>=0.9999", tmp_path)
    report = compiled.precision_report.accuracy_budget
    assert report.all_int8 < 0.9999 <= report.final and report.met
    assert 1 <= len(report.kept_high) <= 2 < len(report.units)
    # The units kept high are named in the report and really left out of INT8.
    assert report.kept_high == [u["unit"] for u in report.units[: len(report.kept_high)]]
    not_quantized = {n["node"] for n in compiled.precision_report.not_quantized}
    assert set(report.kept_high) <= not_quantized
    # On images neither calibration nor the search saw, INT8 stays within 0.2 points of FP32.
    x, y = digits.test_x[VALIDATION:], digits.test_y[VALIDATION:]
    with torch.no_grad():
        fp32 = top1(model(x), y)
    assert top1(compiled(x), y) >= fp32 - 0.2


def test_a_budget_int8_already_meets_keeps_nothing_high(trained, tmp_path):
    compiled = compile_with(trained, "accuracy_drop<=0.002", tmp_path)
    report = compiled.precision_report.accuracy_budget
    assert report.met and report.kept_high == [] and report.units == []


def test_an_unreachable_budget_raises_unless_best_effort(trained, tmp_path):
    with pytest.raises(trtopt.AccuracyBudgetError, match="cannot meet the accuracy budget accuracy >= 1"):
        compile_with(trained, "accuracy>=1.0", tmp_path)
    closest = compile_with(trained, trtopt.AccuracyBudget("accuracy", 1.0, best_effort=True), tmp_path)
    assert not closest.precision_report.accuracy_budget.met


def test_budget_only_applies_to_int8(trained):
    _, model = trained
    with pytest.raises(trtopt.ConfigError, match="accuracy_budget applies to precision='int8'"):
        trtopt.compile(model, (torch.zeros(2, 1, 8, 8),), precision="fp16", accuracy_budget="cosine>=0.99")
