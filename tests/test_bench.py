"""The measurement harness: statistics on known data, accuracy metrics, result schema, profiles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trtopt import ConfigError, InputError, bench, metrics
from trtopt.backends.profiling import LayerProfiler
from trtopt.runtime import TensorRTBackend


# ------------------------------------------------------------------ statistics


def test_percentiles_use_linear_interpolation_on_known_data():
    samples = list(range(1, 101))  # 1..100: rank (n - 1) * p / 100
    assert bench.percentiles(samples) == pytest.approx([50.5, 90.1, 99.01])
    assert bench.percentiles([10.0, 20.0], (0, 50, 100)) == pytest.approx([10.0, 15.0, 20.0])
    assert bench.percentiles([7.0]) == [7.0, 7.0, 7.0]
    # Order of the samples does not matter.
    assert bench.percentiles([3.0, 1.0, 2.0, 4.0], (50,)) == pytest.approx([2.5])


def test_percentiles_of_nothing_is_an_error():
    with pytest.raises(InputError, match="at least one iteration"):
        bench.percentiles([])


def test_latency_stats_from_known_samples():
    stats = bench.LatencyStats.from_samples([4.0, 1.0, 3.0, 2.0, 10.0], batch_size=8, clock="perf_counter")
    assert stats.iterations == 5
    assert (stats.min_ms, stats.max_ms, stats.mean_ms) == (1.0, 10.0, 4.0)
    assert stats.p50_ms == 3.0
    assert stats.p90_ms == pytest.approx(4.0 + 0.6 * 6.0)  # rank 3.6 between 4 and 10
    assert stats.p99_ms == pytest.approx(4.0 + 0.96 * 6.0)
    assert stats.std_ms == pytest.approx(float(np.std([4, 1, 3, 2, 10])))
    assert stats.throughput_per_s == pytest.approx(8 * 1000 / 3.0)


def test_measure_side_by_side_alternates_blocks_rotating_the_first_callable():
    log = []

    def make(tag):
        return lambda x: log.append(tag) or x

    stats, memory = bench.measure_side_by_side(
        [make("a"), make("b")], lambda b: (torch.zeros(b),), [1, 3], warmup=2, iterations=5, rounds=2
    )
    # Per batch size: each one's warm-up, then round 1 (a block of 3, b block of 3: one settling
    # call plus 3 and 2 timed), round 2 starting with b (1 settling plus 2 timed each).
    assert "".join(log) == ("aa" + "bb" + "aaaa" + "bbbb" + "bbb" + "aaa") * 2
    assert [[s.batch_size for s in per_fn] for per_fn in stats] == [[1, 3], [1, 3]]
    assert all(s.iterations == 5 and s.clock == "perf_counter" and s.min_ms >= 0 for per_fn in stats for s in per_fn)
    assert all(m is not None and m.peak_rss_bytes > 0 for m in memory)


@pytest.mark.parametrize("warmup, iterations", [(0, 5), (1, 0)])
def test_measure_side_by_side_rejects_bad_counts(warmup, iterations):
    with pytest.raises(ConfigError):
        bench.measure_side_by_side([lambda x: x], lambda b: (torch.zeros(b),), [1], warmup=warmup, iterations=iterations)


def test_measure_latency_runs_each_batch_size():
    seen = []
    stats = bench.measure_latency(
        lambda x: seen.append(x.shape[0]) or x,
        lambda b: (torch.zeros(b, 3),),
        [1, 4],
        warmup=1,
        iterations=3,
    )
    assert [s.batch_size for s in stats] == [1, 4]
    # 1 warm-up, then 3 rounds (iterations < 5 rounds) of 1 settling and 1 timed call.
    assert seen == [1] * 7 + [4] * 7


# -------------------------------------------------------------------- accuracy


def test_compare_outputs_on_known_values():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cand = torch.tensor([[0.9, 0.2], [0.2, 0.1]])
    acc = bench.compare_outputs(ref, cand)
    assert acc.samples == 2
    assert acc.max_abs_error == pytest.approx(0.9)
    assert acc.mean_abs_error == pytest.approx((0.1 + 0.2 + 0.2 + 0.9) / 4)
    expected_cos = (0.9 + 0.1) / (math.sqrt(2) * math.sqrt(0.81 + 0.04 + 0.04 + 0.01))
    assert acc.cosine_similarity == pytest.approx(expected_cos)
    assert acc.top1_agreement == 0.5  # row 0 agrees (class 0), row 1 does not


def test_compare_outputs_nested_and_not_a_classifier():
    ref = {"a": np.ones((3,)), "b": (torch.ones(2, 1),)}
    acc = bench.compare_outputs(ref, {"a": np.ones((3,)) * 2, "b": (torch.ones(2, 1),)})
    assert acc.top1_agreement is None  # first output is 1-D
    assert acc.max_abs_error == 1.0
    with pytest.raises(InputError, match="shape"):
        bench.compare_outputs(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(InputError, match="outputs"):
        bench.compare_outputs((torch.zeros(2),), (torch.zeros(2), torch.zeros(2)))


def test_metric_names_say_which_cosine_they_take():
    """One sample of two scaled down: per sample nothing changed, flattened the batch's direction did."""
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    scaled = np.array([[1.0, 0.0], [0.0, 0.1]])  # sample 1 same direction, a tenth the size
    assert metrics.mean_sample_cosine([scaled], [reference]) == pytest.approx(1.0)
    flat = metrics.flat_cosine(metrics.flatten([reference]), metrics.flatten([scaled]))
    assert flat == pytest.approx(1.1 / (math.sqrt(2) * math.sqrt(1.01)))
    assert flat < 0.78
    # The benchmark row reports the flattened one; the accuracy budget's "cosine" the per-sample one.
    assert bench.compare_outputs(reference, scaled).cosine_similarity == pytest.approx(flat)
    from trtopt.precision.budget import AccuracyBudget

    assert AccuracyBudget("cosine", 0.99).evaluate([scaled], [reference], None) == pytest.approx(1.0)


def test_worst_mean_abs_error_is_per_output_not_over_all_elements():
    outputs, reference = [np.ones((2, 2)), np.zeros((2, 8))], [np.zeros((2, 2)), np.zeros((2, 8))]
    assert metrics.worst_mean_abs_error(outputs, reference) == 1.0  # the first output's mean
    assert bench.compare_outputs(reference, outputs).mean_abs_error == pytest.approx(4 / 20)
    assert metrics.max_abs_error(outputs, reference) == 1.0


PEAK_MEMORY_CHECK = """
import numpy as np
from trtopt import bench

with bench.PeakMemory() as memory:
    block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, pages touched
u = memory.usage
assert u is not None and u.peak_rss_bytes >= block.nbytes, u
assert u.rss_scope in ("window", "process"), u
assert u.peak_cuda_bytes is None, u
if u.rss_scope == "window":  # Linux: the growth is the block, give or take the allocator
    assert u.growth_bytes >= block.nbytes * 0.9, u
print("ok")
"""


@pytest.mark.slow
def test_peak_memory_sees_an_allocation_inside_the_window():
    # A fresh process: in a long test run the block can land in memory an earlier test
    # freed but the allocator kept resident, and then RSS rightly does not grow.
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY_CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---------------------------------------------------------------- result schema


def _report() -> bench.BenchReport:
    ok = bench.BenchResult(
        model="tiny",
        runtime="trtopt",
        precision="fp32",
        backend="onnxruntime",
        device="cpu",
        compile_time_s=1.5,
        artifact_bytes=1000,
        memory=bench.MemoryUsage(peak_rss_bytes=10_000_000, rss_scope="window", start_rss_bytes=7_000_000),
        latency=[bench.LatencyStats.from_samples([1.0, 2.0, 3.0], 1, "perf_counter")],
        accuracy=bench.Accuracy(samples=4, max_abs_error=1e-6, mean_abs_error=float("nan"),
                                cosine_similarity=1.0, top1_agreement=1.0),
    )
    eager = bench.BenchResult(
        model="tiny", runtime="torch-eager", precision="fp32", backend="torch", device="cpu",
        latency=[bench.LatencyStats.from_samples([4.0, 4.0], 1, "perf_counter")],
    )
    skipped = bench.BenchResult(
        model="tiny", runtime="trtopt", precision="int8", backend="onnxruntime", device="–",
        status="skipped", reason="precision='int8' is not available",
    )
    return bench.BenchReport(results=[eager, ok, skipped], settings={"iterations": 3})


def test_report_json_schema_and_round_trip(tmp_path):
    report = _report()
    path = report.write_json(tmp_path / "r.json")
    data = json.loads(path.read_text())  # strict JSON: NaN was written as null
    assert data["schema"] == bench.SCHEMA and data["schema_version"] == bench.SCHEMA_VERSION
    assert data["percentile_method"] == "linear"
    assert {"results", "settings", "environment", "created_utc"} <= set(data)
    assert {"torch", "onnxruntime", "trtopt", "device"} <= set(data["environment"])
    row = data["results"][1]
    assert set(row) == {
        "model", "runtime", "precision", "backend", "device", "status", "reason",
        "compile_time_s", "artifact_bytes", "memory", "latency", "accuracy", "threads",
    }
    assert set(row["latency"][0]) == {
        "batch_size", "iterations", "clock", "mean_ms", "std_ms", "min_ms",
        "p50_ms", "p90_ms", "p99_ms", "max_ms", "throughput_per_s",
    }
    assert set(row["memory"]) == {"peak_rss_bytes", "rss_scope", "start_rss_bytes", "peak_cuda_bytes"}
    assert set(row["accuracy"]) == {"samples", "max_abs_error", "mean_abs_error", "cosine_similarity", "top1_agreement"}
    assert row["accuracy"]["mean_abs_error"] is None
    assert data["results"][2]["status"] == "skipped" and "not available" in data["results"][2]["reason"]
    again = bench.BenchReport.from_json(data)
    assert again.results[1].latency == report.results[1].latency
    assert again.results[2].reason == report.results[2].reason


def test_report_from_json_refuses_another_schema():
    data = _report().to_json()
    data["schema_version"] = bench.SCHEMA_VERSION + 1
    with pytest.raises(ConfigError, match="rerun the benchmark"):
        bench.BenchReport.from_json(data)


def test_markdown_table_has_speedup_and_skip_reason():
    text = _report().markdown()
    lines = text.splitlines()
    assert lines[0].startswith("| Model | Runtime | Precision | Backend | b1 p50 / p99 ms")
    trtopt_row = next(line for line in lines if "| trtopt | fp32 |" in line)
    assert "2.00 / 2.98" in trtopt_row and "2.00x" in trtopt_row  # eager p50 4.0 / 2.0
    assert trtopt_row.endswith("| 10 (+3) |")
    assert "skipped [1]" in text
    assert "[1] tiny trtopt int8 (onnxruntime): skipped: precision='int8' is not available" in text


def test_plot_writes_a_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    bench.plot_latency_vs_accuracy(_report(), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ input data


def test_structured_images_are_deterministic_and_normalised():
    a = bench.structured_images(4, 32, seed=3)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, bench.structured_images(4, 32, seed=3))
    assert not torch.equal(a, bench.structured_images(4, 32, seed=4))
    # Pixels in [0, 1] normalised with ImageNet's mean and std.
    assert a.min() >= (0 - 0.485) / 0.229 - 1e-4 and a.max() <= (1 - 0.406) / 0.225 + 1e-4


# ------------------------------------------------------------- layer profiles


def test_parse_onnxruntime_profile_drops_warmup_and_aggregates():
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
        {"cat": "Node", "name": "conv_kernel_time", "ts": 10, "dur": 90, "args": {"op_name": "Conv"}},
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
        {"cat": "Node", "name": "conv_kernel_time", "ts": 210, "dur": 40, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv_fence_before", "ts": 209, "dur": 1, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "relu_kernel_time", "ts": 260, "dur": 10, "args": {"op_name": "Relu"}},
        {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100},
        {"cat": "Node", "name": "conv_kernel_time", "ts": 410, "dur": 60, "args": {"op_name": "Conv"}},
    ]
    profile = bench.parse_onnxruntime_profile(events, skip_runs=1)
    assert profile.runs == 2
    assert profile.by_op_type() == [("Conv", pytest.approx(0.05)), ("Relu", pytest.approx(0.005))]
    assert profile.top_layers(1) == [bench.LayerTime("conv", "Conv", pytest.approx(0.05))]
    assert profile.per_run_ms() == pytest.approx(0.055)
    with pytest.raises(InputError, match="profile more"):
        bench.parse_onnxruntime_profile(events[:2], skip_runs=1)


# ------------------------------------------------------- compiled, end to end


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    images = bench.structured_images(6, 16, seed=1)
    return model, images


def test_trtopt_and_torch_side_by_side(tiny):
    model, images = tiny

    def make_inputs(b):
        return (bench.structured_images(b, 16, seed=2),)

    reference = bench.torch_reference(model, (images,), 2)
    candidates = [
        bench.torch_candidate("tiny", model),
        bench.trtopt_candidate(
            "tiny", model, make_inputs(2), precision="fp32", backend="onnxruntime",
            dynamic_shapes={"x": {0: (1, 2, 2)}}, eval_inputs=(images,), reference=reference, eval_chunk=2,
        ),
    ]
    eager, row = bench.run_side_by_side(candidates, make_inputs, [1, 2], warmup=1, iterations=2)
    assert eager.runtime == "torch-eager" and [s.batch_size for s in eager.latency] == [1, 2]
    assert row.status == "ok" and row.backend == "onnxruntime"
    assert [s.batch_size for s in row.latency] == [1, 2]
    assert row.compile_time_s > 0 and row.artifact_bytes > 0
    assert row.memory.peak_rss_bytes > 0
    assert row.accuracy.samples == 6 and row.accuracy.top1_agreement == 1.0
    assert row.accuracy.max_abs_error < 1e-4 and row.accuracy.cosine_similarity > 0.9999

    module = candidates[1].fn
    profile = bench.profile_onnxruntime(module, (images[:2],), runs=3)
    assert profile.runs == 3
    assert {op for op, _ in profile.by_op_type()} & {"Conv", "FusedConv"}
    assert bench.inputs_for_spec(module.spec, 1)[0].shape == (1, 3, 16, 16)


def test_a_backend_that_cannot_run_is_a_skipped_row(tiny):
    from trtopt import _deps

    if _deps.tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT runs here, so backend='tensorrt' is not skipped")
    model, images = tiny
    skipped = bench.trtopt_candidate("tiny", model, (images[:1],), precision="fp32", backend="tensorrt")
    assert skipped.fn is None and skipped.result.status == "skipped" and "cannot run" in skipped.result.reason
    (row,) = bench.run_side_by_side([skipped], lambda b: (images[:b],), [1], warmup=1, iterations=1)
    assert row.latency == [] and row.accuracy is None and row.memory is None


class FakeTensorRTBackend:
    """Double of the TensorRT runtime's profiling surface (``profile_layers``, ``layer_information``).

    Checks that ``profile_tensorrt`` passes the right profile index and run count,
    and joins the per-layer medians with the inspector's layer types. The join is
    the runtime's own ``layer_profile`` (the ``LayerProfiler`` protocol), borrowed.
    """

    name = "tensorrt"
    layer_profile = TensorRTBackend.layer_profile

    def __init__(self) -> None:
        self.calls = []

    def profile_layers(self, feeds, profile_index, runs):
        self.calls.append((sorted(feeds), profile_index, runs))
        return [("conv1 + relu", 0.5), ("fc", 0.2), ("reformat", 0.05)]

    def layer_information(self):
        return {"Layers": [{"Name": "conv1 + relu", "LayerType": "CaskConvolution"},
                           {"Name": "fc", "LayerType": "CaskGemm"}], "Bindings": ["x", "y"]}


def test_profile_tensorrt_joins_times_with_layer_types(tiny):
    from trtopt import compile
    from trtopt.module import CompiledModule

    model, images = tiny
    module = compile(model, (images[:2],), backend="onnxruntime",
                     dynamic_shapes=[{"x": {0: (1, 2, 2)}}, {"x": {0: (3, 6, 6)}}])
    with pytest.raises(ConfigError, match="backend='tensorrt'"):
        bench.profile_tensorrt(module, (images[:1],))
    fake = FakeTensorRTBackend()
    on_trt = CompiledModule(module.onnx_model, module.spec, fake)
    assert isinstance(module.backend, LayerProfiler) and isinstance(fake, LayerProfiler)
    profile = bench.profile_tensorrt(on_trt, (images[:4],), runs=7)
    assert fake.calls == [(["x"], 1, 7)]  # batch 4 lies in the second profile
    assert profile.backend == "tensorrt" and profile.runs == 7
    assert profile.by_op_type() == [("CaskConvolution", 0.5), ("CaskGemm", 0.2), ("?", 0.05)]
    assert profile.per_run_ms() == pytest.approx(0.75)
    # profile_layers asks whichever backend the module runs on, through the protocol.
    assert bench.profile_layers(on_trt, (images[:4],), runs=2).backend == "tensorrt"
    on_ort = bench.profile_layers(module, (images[:2],), runs=2)
    assert on_ort.backend == "onnxruntime" and on_ort.runs == 2 and on_ort.layers
    with pytest.raises(ConfigError, match="cannot profile"):
        bench.profile_layers(CompiledModule(module.onnx_model, module.spec, object()), (images[:1],))


# ------------------------------------------------------- fair and readable rows


def test_every_row_is_timed_with_the_same_thread_count(tiny):
    """torch eager ran with all threads while ONNX Runtime ran with its own count: absurd speedups."""
    model, images = tiny
    seen = []

    def make_inputs(b):
        return (bench.structured_images(b, 16, seed=2),)

    eager = bench.torch_candidate("tiny", model)
    timed_eager = eager.fn

    def eager_call(*inputs):
        seen.append(torch.get_num_threads())
        return timed_eager(*inputs)

    eager.fn = eager_call
    compiled = bench.trtopt_candidate("tiny", model, make_inputs(2), precision="fp32", backend="onnxruntime")
    before = torch.get_num_threads()
    rows = bench.run_side_by_side([eager, compiled], make_inputs, [2], warmup=1, iterations=2, threads=1)
    assert set(seen) == {1} and torch.get_num_threads() == before
    assert [r.threads for r in rows] == [1, 1]
    assert compiled.fn.backend.session.get_session_options().intra_op_num_threads == 1
    table = bench.BenchReport(results=rows).markdown()
    assert "every CPU row ran with 1 intra-op thread(s)" in table


def test_table_marks_unstable_timings_and_shows_small_sizes():
    report = _report()
    eager, ok, _ = report.results
    eager.latency = [bench.LatencyStats.from_samples([4.0] * 8 + [9.0, 9.0], 1, "perf_counter")]
    assert eager.latency[0].unstable and not ok.latency[0].unstable
    lines = report.markdown().splitlines()
    eager_row = next(line for line in lines if "| torch-eager |" in line)
    assert "4.00 / 9.00 †" in eager_row
    assert any(line.startswith("† unstable") and "tiny torch-eager fp32 batch 1: p90 2.2x p50" in line for line in lines)
    trtopt_row = next(line for line in lines if "| trtopt | fp32 |" in line)
    assert "| 0.001 |" in trtopt_row  # 1000 bytes, not "0.0"
