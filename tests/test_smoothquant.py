"""SmoothQuant: the smoothed FP32 graph computes the same function, and where 1/s goes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import trtopt
from trtopt.executor.session import make_session
from trtopt.calibrators import calibrate
from trtopt.calibrators.cache import channel_path
from trtopt.profiles import build_profiles
from trtopt.errors import ConfigError
from trtopt.export import export
from trtopt.graph import cleanup
from trtopt.spec import tensor_specs
from trtopt.precision import plan_int8
from trtopt.precision.smoothquant import smooth, smoothable_groups


class PreNormBlock(nn.Module):
    """LayerNorm feeding only Linear layers (GPT/ViT style): 1/s folds into the LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.gate = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(torch.relu(self.up(h)) * self.gate(h))


class PostNormBlock(nn.Module):
    """LayerNorm whose output also feeds the residual (BERT style): 1/s needs a Mul."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.norm(h + self.linear(h))


def _graph(model: nn.Module) -> onnx.ModelProto:
    x = torch.randn(4, 8, 16)
    profiles = build_profiles(None, {"x": (4, 8, 16)})
    return cleanup(export(model.eval(), (x,), profiles, 19, input_names=["x"]).model)[0]


def _outliers(seed: int) -> np.ndarray:
    """Activations with two outlier channels, as transformer hidden states carry."""
    x = np.random.default_rng(seed).normal(size=(4, 8, 16)).astype(np.float32)
    x[..., 3] *= 30
    x[..., 11] *= -12
    return x


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = make_session(model)
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("block, folded", [(PreNormBlock, 1), (PostNormBlock, 0)])
def test_smoothed_fp32_graph_equals_the_original(block, folded):
    torch.manual_seed(0)
    graph = _graph(block())
    plan = plan_int8(graph)
    groups = smoothable_groups(graph, plan)
    batches = [_outliers(seed) for seed in range(4)]
    result = calibrate(graph, plan.activation_tensors, batches, input_specs=tensor_specs(graph.graph.input),
                       method="minmax", progress=False, channel_max_for=list(groups))
    smoothed, ranges, report = smooth(graph, groups, result.channel_max, alpha=0.85)
    assert sum(r.folded_into is not None for r in report) == folded
    assert len(report) == len(groups) >= 1
    x = _outliers(99)
    expected = _run(graph, x)
    np.testing.assert_allclose(_run(smoothed, x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # The outlier channels are flattened: the smoothed range is well below the raw one.
    first = report[0]
    assert first.amax_after < first.amax_before
    assert ranges[first.tensor] == pytest.approx(first.amax_after)


def test_query_key_value_share_one_scale_and_a_tied_weight_is_left_alone():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q(x) + self.k(x) + self.q(torch.relu(x))  # q's weight is read twice

    graph = _graph(Shared())
    groups = smoothable_groups(graph, plan_int8(graph))
    units = [u for g in groups.values() for u in g]
    weights = [u.weight for u in units]
    assert len(units) == 1 and len(set(weights)) == 1  # only k: q's weight is shared by two MatMuls


def test_channel_statistics_travel_with_the_calibration_cache(tmp_path):
    graph = _graph(PostNormBlock())
    plan = plan_int8(graph)
    groups = list(smoothable_groups(graph, plan))
    inputs = tensor_specs(graph.graph.input)
    cache = tmp_path / "model.cache"
    first = calibrate(graph, plan.activation_tensors, [_outliers(0)], input_specs=inputs, progress=False,
                      cache_path=cache, channel_max_for=groups)
    assert channel_path(cache).is_file()
    again = calibrate(graph, plan.activation_tensors, [_outliers(1)], input_specs=inputs, progress=False,
                      cache_path=cache, channel_max_for=groups)
    assert again.from_cache
    for name in groups:
        np.testing.assert_array_equal(again.channel_max[name], first.channel_max[name])
    channel_path(cache).unlink()  # a cache without them: calibrated again, both rewritten
    third = calibrate(graph, plan.activation_tensors, [_outliers(1)], input_specs=inputs, progress=False,
                      cache_path=cache, channel_max_for=groups)
    assert not third.from_cache and channel_path(cache).is_file()


def test_compile_reports_smoothquant_and_stays_accurate():
    torch.manual_seed(0)
    model = PreNormBlock().eval()
    batches = [torch.from_numpy(_outliers(seed)) for seed in range(6)]
    module = trtopt.compile(model, (batches[0],), precision="int8", calibration_data=batches, backend="onnxruntime")
    report = module.precision_report
    assert report.smoothquant["alpha"] == 0.85
    # up and gate read the LayerNorm (folded); down reads relu(up) * gate (a Mul in front of it).
    assert sorted(t["folded_into"] is not None for t in report.smoothquant["tensors"]) == [False, True]
    assert report.accuracy.cosine > 0.99
    off = trtopt.compile(model, (batches[0],), precision="int8", calibration_data=batches, backend="onnxruntime",
                         smoothquant=None)
    assert off.precision_report.smoothquant is None
    with pytest.raises(ConfigError, match="alpha"):
        trtopt.BuildConfig(smoothquant=1.5)


def test_smoothed_activations_are_calibrated_by_the_chosen_calibrator():
    """calibrator= reaches the tensors SmoothQuant made (x / s): their ranges differ by calibrator,
    and they are range-checked like every other activation."""
    from tests._models import MaskedEncoder, padding_mask

    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(6):
        tokens = torch.randn(4, 8, 32, generator=generator)
        tokens[..., 5] *= 20  # an outlier channel, as transformer hidden states carry
        batches.append((tokens, padding_mask(4, 8)))
    reports = {}
    for method in ("minmax", "percentile"):
        module = trtopt.compile(model, batches[0], precision="int8", calibration_data=batches,
                                backend="onnxruntime", calibrator=method, percentile=99.0)
        reports[method] = module.precision_report
    smoothed = [t["tensor"] for t in reports["percentile"].smoothquant["tensors"]]
    assert smoothed
    for method, report in reports.items():
        assert report.smoothquant["calibrator"] == method
        assert set(smoothed) <= set(report.range_checks)  # checked, with the share each range clips
    minmax, percentile = reports["minmax"].activation_amax, reports["percentile"].activation_amax
    assert all(percentile[name] < minmax[name] for name in smoothed)
    assert reports["percentile"].range_checks[smoothed[0]]["clipped"] > 0
    # auto (the default) keeps max |x| for the smoothed tensors, checked, and says so
    default = trtopt.compile(model, batches[0], precision="int8", calibration_data=batches,
                             backend="onnxruntime").precision_report
    assert default.smoothquant["calibrator"] == "minmax" and set(smoothed) <= set(default.range_checks)
    assert all(default.range_checks[name]["method"] == "minmax" for name in smoothed)
