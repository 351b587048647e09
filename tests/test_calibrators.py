"""Calibrators: the entropy search against a plain transcription, streaming histograms, the
TensorRT cache format, calibration-data errors and calibrate() on real graphs."""

from __future__ import annotations

import logging
import math
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from trtopt.calibrators import CalibrationResult, calibrate, read_cache, write_cache
from trtopt.calibrators.cache import hex_to_scale, scale_to_hex
from trtopt.calibrators.collect import collect
from trtopt.calibrators.data import Progress, iter_batches
from trtopt.calibrators.histogram import StreamingHistogram
from trtopt.calibrators.observers import (
    AUTO_MAX_CLIPPED,
    HistogramObserver,
    entropy_cut,
    entropy_divergences,
    mse_cut,
    quantization_errors,
)
from trtopt.errors import CalibrationError
from trtopt.spec import TensorSpec, tensor_specs

from .helpers import LEVELS, nvidia_entropy_cut


# ----------------------------------------------------------------- the published algorithm


def reference_divergences(counts: np.ndarray, levels: int = LEVELS) -> list[float]:
    """TensorRT's entropy calibration as published (GTC 2017, S7310), one candidate at a time.

    for i in 128..2048: P = bins[0:i] with the outliers added to P[i-1]; Q = bins[0:i] merged
    into 128 levels (bin b -> level b*128//i), each level's sum spread evenly over its non-empty
    bins; normalise both; KL(P || Q), infinite where P > 0 and Q == 0.
    """
    h = np.asarray(counts, dtype=np.float64)
    divergences = []
    for i in range(levels, h.size + 1):
        # Reference distribution P: the first i bins, outliers folded into the last one.
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        # Candidate Q: quantize the first i bins into 128 levels...
        level_of = np.arange(i) * levels // i
        level_sum = np.bincount(level_of, weights=h[:i], minlength=levels)
        level_nonempty = np.bincount(level_of, weights=h[:i] > 0, minlength=levels)
        # ...and expand back to i bins: each level's sum spread over its non-empty bins.
        q = np.zeros(i)
        nonempty = h[:i] > 0
        q[nonempty] = level_sum[level_of[nonempty]] / level_nonempty[level_of[nonempty]]
        if np.any((p > 0) & (q == 0)):
            divergences.append(math.inf)
            continue
        p /= p.sum()
        q /= q.sum()
        used = p > 0
        divergences.append(float(np.sum(p[used] * np.log(p[used] / q[used]))))
    return divergences


def reference_cut(counts: np.ndarray) -> int:
    divergences = reference_divergences(counts)
    best = 0
    for k, kl in enumerate(divergences):
        if kl < divergences[best]:  # strict: the first minimum wins
            best = k
    return LEVELS + best


def _histogram(values: np.ndarray) -> np.ndarray:
    hist = StreamingHistogram()
    hist.add(values.astype(np.float32))
    return hist.counts()


RNG = np.random.default_rng(1234)
N = 100_000
DISTRIBUTIONS = {
    "gaussian": RNG.normal(0, 1, N),
    "laplace_with_outliers": np.concatenate([RNG.laplace(0, 1, N), [40.0, -55.0, 90.0]]),
    "half_normal_after_relu": np.maximum(RNG.normal(0, 1, N), 0),
    "bimodal": np.concatenate([RNG.normal(-3, 0.5, N // 2), RNG.normal(2, 1, N // 2)]),
    "all_zeros": np.zeros(N),
    "constant": np.full(N, 0.75),
    "single_nonzero": np.concatenate([np.zeros(N - 1), [-2.5]]),
}


CONTINUOUS = ["gaussian", "laplace_with_outliers", "half_normal_after_relu", "bimodal"]


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_vectorized_entropy_search_matches_the_published_algorithm(name):
    counts = _histogram(DISTRIBUTIONS[name])
    reference = np.array(reference_divergences(counts))
    vectorized = entropy_divergences(counts)
    finite = np.isfinite(reference)
    assert np.array_equal(finite, np.isfinite(vectorized))
    np.testing.assert_allclose(vectorized[finite], reference[finite], rtol=1e-9, atol=1e-12)
    if name in CONTINUOUS:  # a clear minimum: the tie rule changes nothing
        assert entropy_cut(counts) == reference_cut(counts)


@pytest.mark.parametrize("name", CONTINUOUS)
def test_entropy_agrees_with_nvidias_code_within_one_bin_on_continuous_data(name):
    observer = HistogramObserver("entropy")
    observer.update(DISTRIBUTIONS[name].astype(np.float32))
    width = observer.histogram.width
    nvidia = nvidia_entropy_cut(observer.histogram.counts())
    assert abs(observer.amax() - nvidia * width) <= width * 1.0001


def _uint8_imagenet(rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB pixels normalised as torchvision does for ImageNet: 3 x 256 levels, |x| <= 2.64."""
    pixels = rng.integers(0, 256, (20_000, 3)) / 255.0
    return ((pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).ravel()


_D = np.random.default_rng(99)
DISCRETE = {
    "two_levels": _D.choice([0.0, 1.0], 50_000),
    "three_levels": _D.choice([0.0, 0.5, 1.0], 50_000),
    # A 4-bit image scaled to [-1, 1], most pixels background (-1): the case that put a trained CNN at chance.
    "17_levels_mostly_background": np.where(_D.random(50_000) < 0.7, -1.0, _D.integers(0, 17, 50_000) / 8 - 1),
    "mostly_one_value": np.where(_D.random(50_000) < 0.99, 0.7, 1.0),
    "one_hot": np.eye(10)[_D.integers(0, 10, 5_000)].ravel(),
    "binary_mask": np.where(_D.random(50_000) < 0.8, 0.0, 1.0),
    "additive_mask": np.where(_D.random(50_000) < 0.8, 0.0, -10_000.0),
    "uint8_imagenet": _uint8_imagenet(_D),
    "constant": np.full(50_000, -0.3),
}
# Where NVIDIA's code collapses through float noise (KL ~1e-16 at the full range, 0 at a tiny cut).
NVIDIA_COLLAPSES = {"three_levels": 0.5, "17_levels_mostly_background": 0.125}


@pytest.mark.parametrize("name", list(DISCRETE))
def test_entropy_never_clips_discrete_data(name):
    values = DISCRETE[name].astype(np.float32)
    observer = HistogramObserver("entropy")
    observer.update(values)
    assert observer.amax() == float(np.abs(values).max())
    assert observer.check().clipped == 0.0
    if name in NVIDIA_COLLAPSES:
        nvidia = nvidia_entropy_cut(observer.histogram.counts()) * observer.histogram.width
        assert nvidia == pytest.approx(NVIDIA_COLLAPSES[name], rel=1e-3)


def test_entropy_ties_go_to_the_widest_cut():
    """Two spikes: KL is zero, up to rounding, at the cut holding only the first and at the
    full range. The tie rule takes the full range whichever of the two rounds lower."""
    counts = np.zeros(2048)
    counts[[300, 2047]] = [1000.0, 10.0]
    kl = entropy_divergences(counts)
    assert kl[301 - LEVELS] < 1e-12 and kl[-1] < 1e-12
    assert entropy_cut(counts) == 2048


def test_is_discrete_tells_spikes_from_densities():
    for name in CONTINUOUS:
        observer = HistogramObserver("entropy")
        observer.update(DISTRIBUTIONS[name].astype(np.float32))
        assert not observer.histogram.is_discrete(), name
    for name in DISCRETE:
        observer = HistogramObserver("entropy")
        observer.update(DISCRETE[name].astype(np.float32))
        assert observer.histogram.is_discrete(), name


def test_mse_search_finds_the_least_error_of_a_full_sweep():
    for name in CONTINUOUS:
        counts = _histogram(DISTRIBUTIONS[name])
        width = np.abs(DISTRIBUTIONS[name]).max() / 2048
        cuts = np.arange(LEVELS, 2049)
        errors = quantization_errors(counts, width, cuts * width)
        found = quantization_errors(counts, width, np.array([mse_cut(counts, width) * width]))[0]
        assert found <= errors.min() * 1.01, name


def test_quantization_error_matches_fake_quantized_samples():
    """The histogram's expected error equals numpy's on the samples, within the bin-centre error."""
    values = np.abs(DISTRIBUTIONS["gaussian"]).astype(np.float32)
    observer = HistogramObserver("mse")
    observer.update(values)
    check = observer.check()
    scale = check.amax / 127
    direct = np.minimum(np.rint(values / scale), 127) * scale - values
    expected = np.sqrt(np.mean(direct**2) / np.mean(values.astype(np.float64) ** 2))
    assert check.error == pytest.approx(expected, rel=0.05)
    assert check.clipped == pytest.approx(np.mean(values > check.amax), abs=1e-5)


def test_auto_picks_the_least_error_range_that_clips_little():
    rng = np.random.default_rng(5)
    for values in (DISTRIBUTIONS["gaussian"], DISTRIBUTIONS["laplace_with_outliers"], DISCRETE["three_levels"],
                   # 0.5% outliers far out: the least-error cut clips them; auto keeps them in range.
                   np.where(rng.random(200_000) < 0.005, rng.normal(-40, 1, 200_000), rng.normal(0, 1, 200_000))):
        auto = HistogramObserver("auto")
        auto.update(values.astype(np.float32))
        chosen = auto.check()
        assert chosen.clipped <= AUTO_MAX_CLIPPED
        for method in ("entropy", "percentile", "mse", "minmax"):
            other = HistogramObserver(method)
            other.update(values.astype(np.float32))
            if other.check().clipped <= AUTO_MAX_CLIPPED:
                assert chosen.error <= other.check().error + 1e-12
        assert chosen.method.startswith("auto:")


def test_entropy_edge_cases_give_sensible_ranges():
    def amax(values):
        observer = HistogramObserver("entropy")
        observer.update(values.astype(np.float32))
        return observer.amax()

    assert amax(DISTRIBUTIONS["all_zeros"]) == 0.0
    assert amax(DISTRIBUTIONS["constant"]) == pytest.approx(0.75)
    assert amax(DISTRIBUTIONS["single_nonzero"]) == pytest.approx(2.5)
    # The outliers are clipped: the range ends far below max |x| = 90.
    assert amax(DISTRIBUTIONS["laplace_with_outliers"]) < 20
    # A wide Gaussian keeps most of its range.
    assert 2.5 < amax(DISTRIBUTIONS["gaussian"]) <= np.abs(DISTRIBUTIONS["gaussian"]).max()


def test_exact_zeros_do_not_drag_the_entropy_range_down():
    """Bin 0 takes bin 1's count before the search (as NVIDIA's pytorch-quantization does), so
    the zeros a ReLU produces do not dominate the KL: the range equals that of the positives."""
    values = DISTRIBUTIONS["half_normal_after_relu"].astype(np.float32)
    with_zeros, positives = HistogramObserver("entropy"), HistogramObserver("entropy")
    with_zeros.update(values)
    positives.update(values[values > 0])
    assert with_zeros.amax() == positives.amax()
    raw_cut = entropy_cut(with_zeros.histogram.counts())  # the search without that rule
    assert raw_cut * with_zeros.histogram.width < 0.6 * with_zeros.amax()


# ------------------------------------------------------------------------- histograms


def test_histogram_grows_by_doubling_and_keeps_exact_counts():
    rng = np.random.default_rng(5)
    batches = [rng.normal(0, s, 4000).astype(np.float32) for s in (1.0, 0.5, 3.0, 1.0, 20.0, 2.0)]
    streamed = StreamingHistogram()
    first_range = None
    for batch in batches:
        streamed.add(batch)
        first_range = first_range or streamed.range
    everything = np.concatenate(batches)
    assert streamed.max == float(np.abs(everything).max())
    assert streamed.total == everything.size
    assert streamed.range >= streamed.max and streamed.range == first_range * 2**streamed.growths
    assert streamed.growths >= 4  # 20 sigma vs about 4 sigma in the first batch
    # One pass over all the data on the final grid gives the very same counts.
    one_pass = StreamingHistogram(range_=streamed.range)
    one_pass.add(everything)
    assert np.array_equal(streamed.fine_counts, one_pass.fine_counts)
    # The resampled histogram covers exactly [0, max] and keeps every count.
    counts = streamed.counts()
    assert counts.size == 2048 and counts.sum() == pytest.approx(everything.size)
    assert streamed.width == pytest.approx(streamed.max / 2048)


def test_histogram_of_one_pass_resamples_exactly():
    values = np.random.default_rng(6).laplace(size=50_000).astype(np.float32)
    hist = StreamingHistogram()
    hist.add(values)
    assert hist.growths == 0
    fine = hist.fine_counts[:-1].copy()
    fine[-1] += hist.fine_counts[-1]  # the max itself sits in the top slot
    assert hist.fine_counts[-1] >= 1
    assert np.array_equal(hist.counts(), fine.reshape(2048, 8).sum(axis=1))


@pytest.mark.parametrize("name", ["gaussian", "laplace_with_outliers", "half_normal_after_relu", "bimodal"])
def test_streaming_matches_one_pass(name):
    """minmax is exact; percentile within one bin; entropy within 5% (documented bound).

    For scale: drawing a fresh sample of the same size moves the entropy range by up to
    4-14% on these distributions, far more than streaming does.
    """
    values = np.random.default_rng(7).permutation(DISTRIBUTIONS[name]).astype(np.float32)
    batches = np.array_split(values, 50)
    for method, bound in (("minmax", 0.0), ("percentile", None), ("entropy", 0.05), ("mse", 0.05)):
        streamed, one_pass = HistogramObserver(method), HistogramObserver(method)
        for batch in batches:
            streamed.update(batch)
        one_pass.update(values)
        if bound is None:
            assert abs(streamed.amax() - one_pass.amax()) <= one_pass.histogram.width * 1.0001
        else:
            assert abs(streamed.amax() - one_pass.amax()) <= bound * one_pass.amax()


def test_percentile_is_a_percentile_of_abs_x():
    values = np.random.default_rng(8).normal(size=200_000).astype(np.float32)
    for percentile in (99.0, 99.99):
        observer = HistogramObserver("percentile", percentile)
        observer.update(values)
        exact = np.percentile(np.abs(values), percentile)
        assert abs(observer.amax() - exact) <= 1.0001 * observer.histogram.width
    observer = HistogramObserver("percentile", 100.0)
    observer.update(values)
    assert observer.amax() == float(np.abs(values).max())


# -------------------------------------------------------------------------------- cache


def test_cache_hex_is_big_endian_float32_of_the_scale():
    assert hex_to_scale("3b810a13") == pytest.approx(0.0039380, abs=5e-8)
    assert hex_to_scale("3b810a13") * 127 == pytest.approx(0.5, rel=1e-3)
    assert scale_to_hex(hex_to_scale("3b810a13")) == "3b810a13"


def test_cache_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(9)
    scales = {f"/layer{i}/Conv_output_0": float(s) for i, s in enumerate(rng.uniform(1e-6, 10, 50))}
    scales["(Unnamed Layer* 3) [Convolution]_output"] = 0.0039380  # TensorRT-style name with spaces
    scales["all_zero"] = 0.0
    path = write_cache(tmp_path / "calib.cache", scales, "EntropyCalibration2")
    text = path.read_text()
    assert text.splitlines()[0] == "TRT-100300-EntropyCalibration2"
    cache = read_cache(path)
    assert cache.algorithm == "EntropyCalibration2" and cache.version == "100300"
    assert list(cache.scales) == list(scales)
    for name, scale in scales.items():
        assert cache.scales[name] == float(np.float32(scale))  # float32 precision, bit for bit
    # amax -> scale -> file -> scale -> amax -> scale loses nothing.
    result = CalibrationResult(cache.amax(), "entropy", 0, True)
    write_cache(tmp_path / "again.cache", result.scales(), "EntropyCalibration2")
    assert (tmp_path / "again.cache").read_text() == text


def test_cache_reads_tensorrt_written_files(tmp_path):
    path = tmp_path / "trt.cache"
    path.write_text("TRT-8601-EntropyCalibration2\ninput: 3c010a14\nconv/out:0: 3b810a13\n\n")
    cache = read_cache(path)
    assert cache.version == "8601"
    assert cache.scales["conv/out:0"] == pytest.approx(0.0039380, abs=5e-8)
    assert set(cache.scales) == {"input", "conv/out:0"}


@pytest.mark.parametrize(
    "text, problem",
    [("not a cache\n", "not a TensorRT calibration cache"), ("TRT-100300-MinMaxCalibration\nx: zz\n", "line 2")],
)
def test_corrupt_or_foreign_cache_is_a_calibration_error(tmp_path, text, problem):
    path = tmp_path / "bad.cache"
    path.write_text(text)
    with pytest.raises(CalibrationError, match=problem):
        read_cache(path)


# ------------------------------------------------------------- calibrate() on a small graph


def _small_model() -> onnx.ModelProto:
    """y = relu(a + b) * 2; z = y - a. Inputs a, b: float32 [batch, 4]."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Mul", ["r", "two"], ["y"]),
        helper.make_node("Sub", ["y", "a"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])],
        [two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return onnx.shape_inference.infer_shapes(model)


SMALL = _small_model()
SMALL_SPECS = tensor_specs(SMALL.graph.input)
SMALL_TENSORS = ["a", "s", "r", "y", "z"]


def _small_batches(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)) for _ in range(count)]


def _expected_minmax(batches) -> dict[str, float]:
    out = {}
    for a, b in batches:
        s = a + b
        r = np.maximum(s, 0)
        y = r * 2
        for name, value in zip(SMALL_TENSORS, (a, s, r, y, y - a)):
            out[name] = max(out.get(name, 0.0), float(np.abs(value).max()))
    return out


@pytest.mark.parametrize("form", ["tuples", "dicts", "generator", "dataloader", "npz", "stacked_dict_npz"])
def test_calibration_data_forms(tmp_path, form):
    batches = _small_batches(6)
    if form == "tuples":
        data = batches
    elif form == "dicts":
        data = [{"b": b, "a": a} for a, b in batches]
    elif form == "generator":
        data = (list(batch) + [np.zeros(3)] for batch in batches)  # trailing labels are ignored
    elif form == "dataloader":
        dataset = torch.utils.data.TensorDataset(
            torch.from_numpy(np.concatenate([a for a, _ in batches])),
            torch.from_numpy(np.concatenate([b for _, b in batches])),
        )
        data = torch.utils.data.DataLoader(dataset, batch_size=3)
    else:
        path = tmp_path / "calib.npz"
        stacked = {"a": np.stack([a for a, _ in batches]), "b": np.stack([b for _, b in batches])}
        if form == "npz":
            np.savez(path, stacked["a"], stacked["b"])  # positional arr_0, arr_1
        else:
            np.savez(path, **stacked)
        data = str(path)
    result = calibrate(SMALL, SMALL_TENSORS, data, input_specs=SMALL_SPECS, method="minmax", progress=False)
    assert result.num_batches == 6 and result.method == "minmax" and not result.from_cache
    expected = _expected_minmax(batches)
    for name in SMALL_TENSORS:
        assert result.amax[name] == pytest.approx(expected[name], rel=1e-6)
    assert result.scales()["a"] == pytest.approx(expected["a"] / 127, rel=1e-6)


def test_max_batches_limits_the_run():
    batches = _small_batches(10)
    result = calibrate(SMALL, ["y"], batches, input_specs=SMALL_SPECS, method="minmax", max_batches=3)
    assert result.num_batches == 3
    assert result.amax["y"] == pytest.approx(_expected_minmax(batches[:3])["y"], rel=1e-6)


def _bad(index: int, **change):
    """Six good batches with batch ``index`` replaced by ``change``."""
    batches = [{"a": a, "b": b} for a, b in _small_batches(6)]
    batches[index] = {**batches[index], **change}
    return batches


def _nan_batch() -> np.ndarray:
    array = np.ones((3, 4), np.float32)
    array[1, 2] = np.nan
    return array


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "yielded no batches"),
        (iter(()), "yielded no batches"),
        (_bad(2, c=np.ones((3, 4), np.float32)), r"batch 2 names unknown input\(s\) \['c'\]"),
        ([{"a": np.ones((3, 4), np.float32)}], r"batch 0 lacks input\(s\) \['b'\]"),
        ([(np.ones((3, 4), np.float32),)], "batch 0 has 1 element"),
        (_bad(1, a=np.ones((3, 4, 1), np.float32)), "batch 1, input 'a' has rank 3"),
        (_bad(4, b=np.ones((3, 5), np.float32)), "batch 4, input 'b' has shape .* dimension 1 at 4"),
        (_bad(3, a=np.ones((3, 4), np.float64)), "batch 3, input 'a' has dtype float64 .* float32"),
        (_bad(5, b=_nan_batch()), "batch 5, input 'b' contains NaN"),
        (_bad(0, a=np.full((3, 4), np.inf, np.float32)), "batch 0, input 'a' contains Inf"),
        ([("x", "y")], "batch 0, input 'a' is a str"),
        (None, "calibration_data is None"),
        ("calib.txt", "not a .npz file"),
        ("missing.npz", "does not exist"),
        (42, "calibration_data is a int"),
    ],
)
def test_bad_calibration_data_is_named(data, message):
    with pytest.raises(CalibrationError, match=message):
        calibrate(SMALL, SMALL_TENSORS, data, input_specs=SMALL_SPECS, method="minmax", progress=False)


def test_bad_tensor_names_and_specs_are_named():
    data = _small_batches(1)
    with pytest.raises(CalibrationError, match="'nope' is neither a graph input nor a node output"):
        calibrate(SMALL, ["nope"], data, input_specs=SMALL_SPECS)
    with pytest.raises(CalibrationError, match="'two' is a weight"):
        calibrate(SMALL, ["two"], data, input_specs=SMALL_SPECS)
    with pytest.raises(CalibrationError, match="input_specs do not match"):
        calibrate(SMALL, ["y"], data, input_specs=SMALL_SPECS[:1])
    with pytest.raises(CalibrationError, match="not a calibrator"):
        calibrate(SMALL, ["y"], data, input_specs=SMALL_SPECS, method="kl")


def test_activation_overflow_names_tensor_and_batch():
    batches = _small_batches(3)
    batches[2] = (np.full((3, 4), 3e38, np.float32), np.full((3, 4), 3e38, np.float32))  # a + b overflows
    with pytest.raises(CalibrationError, match="tensor 's' holds Inf in calibration batch 2"):
        calibrate(SMALL, ["s"], batches, input_specs=SMALL_SPECS, method="entropy")


class FakeUnreadableData:
    """A calibration set that fails when iterated: proves a valid cache skips calibration."""

    def __iter__(self):
        raise AssertionError("calibration data was read although the cache was valid")


def test_valid_cache_skips_calibration(tmp_path):
    path = tmp_path / "calib.cache"
    first = calibrate(SMALL, SMALL_TENSORS, _small_batches(4), input_specs=SMALL_SPECS, cache_path=path, method="entropy")
    assert path.read_text().startswith("TRT-100300-EntropyCalibration2\n")
    again = calibrate(SMALL, ["y", "a"], FakeUnreadableData(), input_specs=SMALL_SPECS, cache_path=path, method="entropy")
    assert again.from_cache and again.num_batches == 0 and again.method == "entropy"
    assert again.amax == {n: float(np.float32(first.amax[n] / 127)) * 127 for n in ("y", "a")}


@pytest.mark.parametrize("case", ["other_method", "missing_tensors", "other_percentile"])
def test_mismatching_cache_is_reported_and_replaced(tmp_path, caplog, case):
    path = tmp_path / "calib.cache"
    if case == "other_method":
        write_cache(path, {n: 1.0 for n in SMALL_TENSORS}, "MinMaxCalibration")
        method, expected_header = "entropy", "EntropyCalibration2"
    elif case == "missing_tensors":
        write_cache(path, {"a": 1.0, "y": 1.0}, "EntropyCalibration2")
        method, expected_header = "entropy", "EntropyCalibration2"
    else:
        write_cache(path, {n: 1.0 for n in SMALL_TENSORS}, "Percentile99.9Calibration")
        method, expected_header = "percentile", "Percentile99.99Calibration"
    batches = _small_batches(4)
    with caplog.at_level(logging.WARNING, logger="trtopt.calibrators"):
        result = calibrate(SMALL, SMALL_TENSORS, batches, input_specs=SMALL_SPECS, method=method, cache_path=path)
    assert not result.from_cache and result.num_batches == 4
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "recalibrating and overwriting" in warning
    if case == "missing_tensors":
        assert "lacks 3 of the 5 tensors" in warning and "'s'" in warning
    cache = read_cache(path)
    assert cache.algorithm == expected_header and set(cache.scales) == set(SMALL_TENSORS)
    assert cache.scales["a"] != 1.0


def test_a_file_that_is_not_a_cache_is_not_overwritten(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    with pytest.raises(CalibrationError, match="not a TensorRT calibration cache"):
        calibrate(SMALL, ["y"], _small_batches(2), input_specs=SMALL_SPECS, cache_path=path)
    assert path.read_text() == "my notes\n"


class FakeLeakCheckObserver:
    """A double observer: it holds weak references to every array it is fed and checks, at each
    batch, that the arrays of every earlier batch have been freed, i.e. that collection keeps no
    outputs between batches."""

    def __init__(self, log: list[tuple[int, weakref.ref]]):
        self.log = log
        self.batch = 0

    def update(self, values: np.ndarray) -> float:
        self.log.append((self.batch, weakref.ref(values)))
        stale = [ref for batch, ref in self.log if batch < self.batch and ref() is not None]
        assert not stale, f"{len(stale)} arrays of old batches are still alive at batch {self.batch}"
        self.batch += 1
        return float(np.abs(values).max())

    def amax(self) -> float:
        return 0.0


def test_collection_keeps_no_outputs_between_batches():
    log: list[tuple[int, weakref.ref]] = []
    observers = {name: FakeLeakCheckObserver(log) for name in ("s", "y", "z")}
    batches = iter_batches(_small_batches(12), SMALL_SPECS)
    assert collect(SMALL, observers, batches, Progress(None, enabled=False)) == 12
    assert len(log) == 36
    assert all(ref() is None for _, ref in log)


def test_progress_line_shows_eta(capsys):
    bar = Progress(total=10, delay_s=0.0, every_s=0.0)
    bar.update(4)
    bar.close(10)
    err = capsys.readouterr().err
    assert "4/10 batches" in err and "ETA" in err and "10 batches in" in err


# ---------------------------------------------------------- calibrate() on an exported CNN


@pytest.fixture(scope="module")
def cnn():
    from tests._models import ResidualCNN
    from trtopt.profiles import build_profiles
    from trtopt.export import export
    from trtopt.graph import cleanup

    torch.manual_seed(0)
    example = torch.randn(2, 3, 16, 16)
    profiles = build_profiles({"x": {0: (1, 2, 4)}}, {"x": tuple(example.shape)})
    exported = export(ResidualCNN().eval(), (example,), profiles, 19, input_names=["x"])
    model, _ = cleanup(exported.model)
    return model


def _all_activations(model: onnx.ModelProto) -> list[str]:
    return ["x"] + [name for node in model.graph.node for name in node.output]


def test_calibrate_exported_cnn_minmax_matches_numpy(cnn):
    names = _all_activations(cnn)
    rng = np.random.default_rng(10)
    batches = [torch.from_numpy(rng.normal(size=(int(rng.integers(1, 5)), 3, 16, 16)).astype(np.float32)) for _ in range(5)]
    specs = [TensorSpec("x", "float32", ("x_dim0", 3, 16, 16))]
    result = calibrate(cnn, names, batches, input_specs=specs, method="minmax")

    # Reference: run the graph with every activation exposed and take numpy's max |x|.
    exposed = onnx.ModelProto()
    exposed.CopyFrom(cnn)
    infos = {vi.name: vi for vi in list(cnn.graph.value_info) + list(cnn.graph.output)}
    del exposed.graph.output[:]
    exposed.graph.output.extend(infos[n] for n in names[1:])
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = {n: 0.0 for n in names}
    for batch in batches:
        x = batch.numpy()
        for name, value in zip(names, [x] + session.run(names[1:], {"x": x})):
            expected[name] = max(expected[name], float(np.abs(value).max()))
    assert set(result.amax) == set(names)
    for name in names:
        assert result.amax[name] == pytest.approx(expected[name], rel=1e-5), name

    for method in ("entropy", "percentile"):
        ranged = calibrate(cnn, names, batches, input_specs=specs, method=method)
        assert all(0 < ranged.amax[n] <= result.amax[n] * (1 + 1e-6) for n in names), method


def test_stacked_tensor_and_single_batch_forms(cnn):
    specs = [TensorSpec("x", "float32", ("x_dim0", 3, 16, 16))]
    stacked = torch.randn(3, 2, 3, 16, 16)
    result = calibrate(cnn, ["x"], stacked, input_specs=specs, method="minmax")
    assert result.num_batches == 3 and result.amax["x"] == pytest.approx(float(stacked.abs().max()))
    single = calibrate(cnn, ["x"], stacked[0].numpy(), input_specs=specs, method="minmax")
    assert single.num_batches == 1 and single.amax["x"] == pytest.approx(float(stacked[0].abs().max()))
    with pytest.raises(CalibrationError, match="has rank 6"):
        calibrate(cnn, ["x"], stacked[None], input_specs=specs)
