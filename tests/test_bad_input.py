"""Bad input gets a TrtoptError whose message names the problem (and the fix)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import trtopt
from tests._models import TwoInputsDictOut


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    return trtopt.compile(
        TwoInputsDictOut().eval(),
        (torch.randn(2, 6), torch.randn(2, 3)),
        dynamic_shapes={"left": {0: (1, 4, 8)}, "right": {0: (1, 4, 8)}},
        backend="onnxruntime",
    )


def test_shape_outside_profile_names_input_dim_value_and_range(compiled):
    with pytest.raises(trtopt.ShapeError) as info:
        compiled(torch.randn(9, 6), torch.randn(9, 3))
    message = str(info.value)
    assert "'left'" in message and "dimension 0" in message and "is 9" in message and "1..8" in message
    assert isinstance(info.value, ValueError)


def test_static_dimension_mismatch(compiled):
    with pytest.raises(trtopt.ShapeError, match=r"'left' dimension 1 is 7.*static"):
        compiled(torch.randn(2, 7), torch.randn(2, 3))


def test_wrong_rank(compiled):
    with pytest.raises(trtopt.ShapeError, match=r"'right' has rank 3.*expects rank 2"):
        compiled(torch.randn(2, 6), torch.randn(2, 3, 1))


def test_wrong_dtype_names_the_conversion(compiled):
    with pytest.raises(trtopt.InputError, match=r"'left' has dtype float64 but the model expects float32.*float\(\)"):
        compiled(torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 3))
    with pytest.raises(trtopt.InputError, match="int64"):
        compiled(np.zeros((2, 6), dtype=np.int64), np.zeros((2, 3), dtype=np.float32))


def test_missing_unknown_and_duplicate_inputs(compiled):
    with pytest.raises(trtopt.InputError, match=r"missing input\(s\) 'right'.*\(left, right\)"):
        compiled(torch.randn(2, 6))
    with pytest.raises(trtopt.InputError, match=r"unknown input 'middle'"):
        compiled(torch.randn(2, 6), torch.randn(2, 3), middle=torch.randn(1))
    with pytest.raises(trtopt.InputError, match="both by position and by keyword"):
        compiled(torch.randn(2, 6), torch.randn(2, 3), left=torch.randn(2, 6))
    with pytest.raises(trtopt.InputError, match="pass a torch.Tensor or a numpy array"):
        compiled([[0.0] * 6] * 2, torch.randn(2, 3))


def test_inputs_within_their_ranges_but_no_common_profile():
    model = TwoInputsDictOut().eval()
    compiled = trtopt.compile(
        model,
        (torch.randn(2, 6), torch.randn(2, 3)),
        dynamic_shapes=[
            {"left": {0: (1, 2, 4)}, "right": {0: (1, 2, 4)}},
            {"left": {0: (5, 8, 8)}, "right": {0: (5, 8, 8)}},
        ],
        backend="onnxruntime",
    )
    with pytest.raises(trtopt.ShapeError, match="no single profile holds all of them"):
        compiled(torch.randn(2, 6), torch.randn(6, 3))


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"nope": {0: (1, 2, 4)}}, r"unknown input\(s\) \['nope'\].*\['left', 'right'\]"),
        ({"left": {0: (4, 2, 8)}}, r"min <= opt <= max"),
        ({"left": {0: (0, 2, 8)}}, r"min must be a positive integer"),
        ({"left": {0: (1, 2)}}, r"must be a \(min, opt, max\) tuple of ints"),
        ({"left": {0: (1.0, 2, 3)}}, r"must be a \(min, opt, max\) tuple of ints"),
        ({"left": {2: (1, 2, 3)}}, r"dimension 2.*rank 2"),
        ({"left": [1, 2, 3]}, r"must be a dict"),
        ([], r"empty list"),
        ("left", r"has type str"),
        (
            [{"left": {0: (1, 2, 4)}, "right": {0: (1, 2, 4)}}, {"left": {0: (5, 6, 8)}}],
            r"profile 1 makes different dimensions dynamic",
        ),
    ],
)
def test_invalid_dynamic_shapes_spec(spec, match):
    with pytest.raises(trtopt.ConfigError, match=match):
        trtopt.compile(TwoInputsDictOut(), (torch.randn(2, 6), torch.randn(2, 3)), dynamic_shapes=spec)


def test_range_the_model_fixes_is_a_config_error():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(trtopt.ConfigError, match="dynamic_shapes does not fit the model"):
        trtopt.compile(conv, (torch.randn(2, 3, 8, 8),), dynamic_shapes={"input": {1: (1, 3, 8)}})


def test_shared_dims_need_equal_ranges():
    with pytest.raises(trtopt.ConfigError):
        trtopt.compile(
            TwoInputsDictOut(),
            (torch.randn(2, 6), torch.randn(2, 3)),
            dynamic_shapes={"left": {0: (1, 2, 4)}, "right": {0: (1, 2, 8)}},
        )


@pytest.fixture(autouse=True)
def export_logs_in_tmp_path(tmp_path, monkeypatch):
    """A failed export writes its log to the temp dir (the ExportError names it): keep it in tmp_path."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


class Eig(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eig(x)[0].real


class DataDependentBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_unsupported_operator_is_an_export_error():
    with pytest.raises(trtopt.ExportError, match="could not be exported to ONNX.*linalg_eig"):
        trtopt.compile(Eig(), (torch.randn(4, 4),))


def test_data_dependent_control_flow_is_refused_not_traced():
    with pytest.raises(trtopt.ExportError, match="data-dependent value"):
        trtopt.compile(DataDependentBranch(), (torch.randn(4, 4),))


def test_export_error_gives_each_exporters_root_cause_and_keeps_fx_graphs_off_the_terminal(capfd):
    with pytest.raises(trtopt.ExportError) as caught:
        trtopt.compile(DataDependentBranch(), (torch.randn(4, 4),))
    message = str(caught.value)
    # torch.export's own cause and the user's line, not its "step 1/3 ... Next steps" page.
    assert re.search(r"torch.export-based exporter said: \w+: Could not guard on data-dependent expression", message)
    assert "in forward: if x.sum() > 0:" in message
    assert "TorchScript exporter (fallback) said: had to fix a data-dependent value" in message
    assert "step 1/3" not in message and "torch.where" in message
    log = Path(re.search(r"full output and tracebacks: (\S+)\.$", message).group(1))
    assert "GuardOnDataDependentSymNode" in log.read_text()
    log.unlink()
    printed = capfd.readouterr()
    assert "def forward(" not in printed.err + printed.out  # the FX graphs went to the log file


@pytest.mark.slow
def test_t5_encoder_export_error_names_the_view_torch_export_could_not_do():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    model = transformers.T5EncoderModel(config).eval()
    with pytest.raises(trtopt.ExportError) as caught:
        trtopt.compile(model, (torch.randint(0, 64, (2, 8)),),
                       dynamic_shapes={"input_ids": {0: (1, 2, 4), 1: (2, 8, 16)}})
    message = str(caught.value)
    assert re.search(r"torch.export-based exporter said: ValueError: Cannot view a tensor with shape", message)
    assert "modeling_t5.py" in message and "TorchScript exporter (fallback) said:" in message
    Path(re.search(r"full output and tracebacks: (\S+)\.$", message).group(1)).unlink()


def test_settings_errors():
    with pytest.raises(trtopt.ConfigError, match="precision='int2'.*'fp32', 'fp16', 'int8'"):
        trtopt.compile(TwoInputsDictOut(), (torch.randn(2, 6), torch.randn(2, 3)), precision="int2")
    with pytest.raises(trtopt.ConfigError, match=r"unknown setting\(s\) warp_speed"):
        trtopt.compile(TwoInputsDictOut(), (torch.randn(2, 6), torch.randn(2, 3)), warp_speed=9)
    with pytest.raises(trtopt.InputError, match="torch.nn.Module"):
        trtopt.compile(lambda x: x, (torch.randn(2),))
    with pytest.raises(trtopt.InputError, match="example input 'right' is a float"):
        trtopt.compile(TwoInputsDictOut(), (torch.randn(2, 6), 3.0))


def test_accuracy_budget_with_only_a_calibration_cache_names_the_missing_data(tmp_path):
    # The cache supplies the ranges, so calibration needs no data; the budget still does:
    # it measures the quantized module against FP32 on held-back batches.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    example = (torch.randn(2, 3, 8, 8),)
    settings = dict(precision="int8", backend="onnxruntime", calibration_cache=str(tmp_path / "m.cache"))
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    trtopt.compile(model, example, calibration_data=batches, **settings)
    assert (tmp_path / "m.cache").exists()
    with pytest.raises(trtopt.ConfigError, match="accuracy_budget needs data.*pass validation_data.*calibration_data"):
        trtopt.compile(model, example, accuracy_budget="cosine>=0.99", **settings)
