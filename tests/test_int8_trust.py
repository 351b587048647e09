"""INT8 that never silently wrecks a model, on the data that broke it.

A CNN trained on digits scaled to [-1, 1] (17 pixel values, most of them -1: a
4-bit image) fell to chance at INT8 with the entropy calibrator of the time,
which clipped the input at 0.125. These tests hold every calibrator to FP32's
accuracy on that model, and check that a module with a bad range says so.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import trtopt
from tests.helpers import LEVELS, nvidia_entropy_cut
from trtopt.bench.digits import DigitsCNN, signed, top1
from trtopt.calibrators import write_cache
from trtopt.calibrators.observers import HistogramObserver, entropy_cut, entropy_divergences
from trtopt.precision.readout import AccuracyReadout, compare

INT8_TOLERANCE = 1.0  # top-1 points


@pytest.fixture(scope="module")
def signed_digits(digits):
    return signed(digits)  # 0 -> -1 (background), 1 -> 1


@pytest.fixture(scope="module")
def signed_cnn(signed_digits, trained_digits):
    model = trained_digits.get(DigitsCNN, epochs=8, encoding=signed)
    fp32 = trtopt.compile(model, (signed_digits.test_x[:4],), dynamic_shapes={"x": {0: (1, 64, 512)}}, backend="onnxruntime")
    return model, top1(fp32(signed_digits.test_x), signed_digits.test_y)


def _calibration(digits):
    """Every training image (never the test set): on exactly these the old search clipped at 0.1255."""
    return list(torch.split(digits.train_x, 128))


def test_the_reported_collapse_is_fixed(signed_digits):
    """The first (old trtopt) and the last (NVIDIA's code) cut of least KL both clip this input
    to about 0.125 through float noise; the tie rule and the discrete rule keep max |x| = 1."""
    values = signed_digits.train_x.numpy()
    observer = HistogramObserver("entropy")
    for batch in np.array_split(values, 11):
        observer.update(batch)
    counts = observer.histogram.counts()
    counts[0] = counts[1]
    first_least = (LEVELS + int(np.argmin(entropy_divergences(counts)))) * observer.histogram.width
    assert first_least == pytest.approx(0.1255, abs=1e-3)
    assert nvidia_entropy_cut(observer.histogram.counts()) * observer.histogram.width == pytest.approx(0.125, abs=1e-3)
    assert entropy_cut(counts) == 2048  # the tie rule alone already keeps the full range
    assert observer.amax() == 1.0


def _int8(model, digits, **settings):
    return trtopt.compile(
        model,
        (digits.test_x[:4],),
        precision="int8",
        calibration_data=_calibration(digits),
        dynamic_shapes={"x": {0: (1, 64, 512)}},
        backend="onnxruntime",
        **settings,
    )


@pytest.mark.parametrize("calibrator", [None, "entropy", "mse", "auto", "minmax", "percentile"])
def test_every_calibrator_keeps_a_few_level_image_model_accurate(signed_digits, signed_cnn, calibrator, caplog):
    model, fp32 = signed_cnn
    assert fp32 > 95.0
    settings = {} if calibrator is None else {"calibrator": calibrator}
    with caplog.at_level(logging.INFO, logger="trtopt"):
        module = _int8(model, signed_digits, **settings)
    accuracy = top1(module(signed_digits.test_x), signed_digits.test_y)
    assert fp32 - accuracy <= INT8_TOLERANCE, (calibrator, fp32, accuracy)
    report = module.precision_report
    # The input takes 17 values in [-1, 1]: none may be clipped.
    assert report.activation_amax["x"] == 1.0
    assert report.range_checks["x"]["clipped"] == 0.0
    assert report.accuracy.top1_agreement >= 0.95
    assert "INT8 accuracy against FP32: cosine" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "drifts" in r.getMessage()]


def test_a_bad_range_is_reported_with_the_worst_tensors(signed_digits, signed_cnn, tmp_path, caplog):
    """A calibration cache that clips the input at 0.125 (what the old entropy search chose).

    SmoothQuant is off: its per-channel statistics are not in a hand-written cache."""
    model, _ = signed_cnn
    good = _int8(model, signed_digits, calibrator="minmax", smoothquant=None)
    amax = dict(good.precision_report.activation_amax, x=0.125)
    cache = tmp_path / "bad.cache"
    write_cache(cache, {name: a / 127 for name, a in amax.items()}, "MinMaxCalibration")
    with caplog.at_level(logging.INFO, logger="trtopt"):
        bad = _int8(model, signed_digits, calibrator="minmax", smoothquant=None, calibration_cache=str(cache))
    report = bad.precision_report
    assert report.calibration_from_cache
    readout = report.accuracy
    assert readout.top1_agreement < 0.9 and readout.cosine < 0.99 and readout.held_back
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "drifts" in r.getMessage()]
    assert len(warnings) == 1
    message = warnings[0]
    # The worst tensor is named with its clipped share, measured on the held-back data.
    assert "'x' clips" in message and "from the calibration cache" in message
    assert "accuracy_budget=" in message and "calibrator=" in message and "exclude_nodes=" in message


def test_fp16_readout_and_the_one_batch_case(signed_digits, signed_cnn, caplog):
    model, _ = signed_cnn
    with caplog.at_level(logging.INFO, logger="trtopt"):
        module = trtopt.compile(
            model, (signed_digits.train_x[:32],), precision="fp16",
            calibration_data=[signed_digits.train_x[:32]], backend="onnxruntime",
        )
    readout = module.precision_report.accuracy
    # One fixed-size batch cannot be split: the readout says it was measured on calibration data.
    assert readout.held_back is False and readout.samples == 32
    assert readout.cosine > 0.999 and readout.top1_agreement == 1.0
    assert "FP16 accuracy against FP32" in caplog.text and "none is held back" in caplog.text


def test_readout_figures():
    reference = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).numpy()]
    outputs = [torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0]]).numpy()]
    readout = compare(outputs, reference, held_back=True)
    assert readout.top1_agreement == pytest.approx(2 / 3)
    assert readout.min_cosine == pytest.approx(0.0)
    assert readout.max_abs == pytest.approx(1.0)
    assert not readout.ok
    # Not a classifier: no top-1 agreement, judged by cosine alone.
    flat = compare([outputs[0].reshape(-1)], [reference[0].reshape(-1)], held_back=True)
    assert flat.top1_agreement is None
    assert isinstance(flat, AccuracyReadout)
