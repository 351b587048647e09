"""The thin call path: checked shapes are remembered, right-typed inputs reach ONNX Runtime uncopied,
and every input error is still raised as before (tests/test_bad_input.py covers the messages)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trtopt


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).eval()
    x = torch.randn(4, 16)
    module = trtopt.compile(model, (x,), backend="onnxruntime", dynamic_shapes={"input": {0: (1, 4, 8)}})
    return model, module


def recording(module, monkeypatch):
    seen = []
    run_numpy = module.backend.run_numpy

    def record(arrays):
        seen.append(dict(arrays))
        return run_numpy(arrays)

    monkeypatch.setattr(module.backend, "run_numpy", record)
    return seen


def test_checked_inputs_reach_the_session_without_a_copy(linear, monkeypatch):
    model, module = linear
    seen = recording(module, monkeypatch)
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    first = module(x)  # full checks, then the shape is remembered
    second = module(x)
    assert len(seen) == 1 and seen[0]["input"] is x
    np.testing.assert_array_equal(first, second)
    t = torch.from_numpy(x)
    out = module(t)
    assert isinstance(out, torch.Tensor) and np.shares_memory(seen[-1]["input"], x)
    with torch.no_grad():
        np.testing.assert_allclose(out.numpy(), model(t).numpy(), rtol=1e-5, atol=1e-6)


def test_errors_are_unchanged_after_a_shape_is_remembered(linear):
    _, module = linear
    x = np.zeros((4, 16), np.float32)
    module(x)
    with pytest.raises(trtopt.InputError, match="dtype float64"):
        module(x.astype(np.float64))
    with pytest.raises(trtopt.ShapeError, match="dimension 0 is 9"):
        module(np.zeros((9, 16), np.float32))
    with pytest.raises(trtopt.ShapeError, match="rank"):
        module(np.zeros((4, 16, 1), np.float32))
    with pytest.raises(trtopt.InputError, match="positional"):
        module(x, x)
    with pytest.raises(trtopt.InputError):
        module([[0.0] * 16] * 4)


def test_other_inputs_take_the_full_path(linear, monkeypatch):
    _, module = linear
    seen = recording(module, monkeypatch)
    x = np.zeros((4, 16), np.float32)
    module(x)
    module(np.asfortranarray(x))  # not C-contiguous: copied by the full path
    module(torch.zeros(4, 16, requires_grad=True))  # needs detach
    module(input=x)  # by name
    module(torch.zeros(16, 4).t())  # a transposed view
    assert seen == [] or all(a["input"].flags.c_contiguous for a in seen)
    out = module(torch.zeros(4, 16, requires_grad=True))
    assert isinstance(out, torch.Tensor)


def test_overhead_benchmark_runs_on_a_tiny_setting(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"
    spec = importlib.util.spec_from_file_location("overhead_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--rounds", "2", "--calls", "5", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["raw session.run", "raw session.run, torch in and out", "trtopt, numpy input", "trtopt, torch input"]
    # Each trtopt call is measured against the raw call with the same kind of inputs and outputs.
    assert rows["trtopt, torch input"]["baseline"] == "raw session.run, torch in and out"
    torch_row = rows["trtopt, torch input"]
    baseline = rows[torch_row["baseline"]]["median_us"]
    assert torch_row["overhead_us"] == pytest.approx(torch_row["median_us"] - baseline, abs=0.011)
    assert (tmp_path / "overhead.json").is_file() and "| overhead us |" in (tmp_path / "overhead.md").read_text()
