"""What a compile does more than once: graphs loaded into ONNX Runtime, passes over the data.

Counted with spies, not timed (timings belong in benchmarks/compile_cost.py).
"""

from __future__ import annotations

import contextlib

import hashlib
import math
from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import trtopt
from trtopt.precision import probe


class Tagger(nn.Module):
    """Two Linear layers and a LayerNorm: INT8 plans Q/DQ, SmoothQuant has a group to smooth."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.first, self.second = nn.Linear(8, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(self.norm(x)))).mean(dim=1)


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(4, 5, 8, generator=generator) for _ in range(10)]


@pytest.fixture()
def session_loads(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, int]]:
    """Every ONNX Runtime session made, by (sha-256 of the graph it loaded, intra-op threads)."""
    loads: Counter[tuple[str, int]] = Counter()
    real = ort.InferenceSession

    def spy(model: Any, options: ort.SessionOptions | None = None, *args: Any, **kwargs: Any) -> ort.InferenceSession:
        data = model if isinstance(model, bytes) else open(model, "rb").read()
        loads[(hashlib.sha256(data).hexdigest(), options.intra_op_num_threads if options else 0)] += 1
        return real(model, options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    return loads


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_a_compile_loads_no_graph_into_onnx_runtime_twice(session_loads, precision):
    # The profile-shape check and the FP32 reference run the exported graph; the readout and the
    # CPU backend run the compiled one: each pair shares one session.
    batches = _batches()
    module = trtopt.compile(
        Tagger().eval(), (batches[0],), precision=precision, backend="onnxruntime",
        calibration_data=None if precision == "fp32" else batches, dynamic_shapes={"x": {0: (1, 4, 8)}},
    )
    assert module(batches[0]).shape == (4, 10)
    assert session_loads, "the spy saw no session"
    assert [key for key, count in session_loads.items() if count > 1] == []


def test_an_accuracy_budget_search_loads_no_graph_twice(session_loads):
    # Each module the search builds keeps other units high; the FP32 graph its float part is
    # measured on is the same every time, so it is measured once.
    batches = _batches()
    trtopt.compile(
        Tagger().eval(), (batches[0],), precision="int8", backend="onnxruntime", calibration_data=batches,
        accuracy_budget="cosine>=0.99999", dynamic_shapes={"x": {0: (1, 4, 8)}},
    )
    assert [count for count in session_loads.values() if count > 1] == []


def test_the_torchlib_registry_is_built_once_and_each_export_is_the_same(monkeypatch):
    try:
        from torch.onnx._internal.exporter import _registration

        original = _registration.ONNXRegistry.__dict__["from_torchlib"].__func__
    except (ImportError, KeyError, AttributeError):
        pytest.skip("this torch has no ONNXRegistry.from_torchlib")
    from trtopt import export

    builds = []

    def counted(cls: type, *args: Any, **kwargs: Any) -> Any:
        builds.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counted))
    monkeypatch.setattr(export._TORCHLIB, "_built", {})
    model, batches = Tagger().eval(), _batches()

    def exported() -> bytes:
        return trtopt.compile(model, (batches[0],), backend="onnxruntime").onnx_model.SerializeToString()

    graphs = [exported(), exported()]
    assert len(builds) == 1
    assert _registration.ONNXRegistry.__dict__["from_torchlib"].__func__ is counted  # restored after each export
    monkeypatch.setattr(export._TORCHLIB, "reused", contextlib.nullcontext)  # the registry rebuilt per export
    assert graphs[0] == graphs[1] == exported()
    assert len(builds) == 2


def _awkward_graph() -> onnx.ModelProto:
    """Tensors a peak can go wrong on: exp(x) overflows to Inf for x > 88, its negation is -Inf
    and a Relu hides both; exp(x) - exp(x) and log(x) hold NaN past their first element (log
    without any Inf); an empty slice; an FP16 tensor; an int64 output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    outputs = [helper.make_tensor_value_info(n, t, None) for n, t in (
        ("hidden", TensorProto.FLOAT), ("nan", TensorProto.FLOAT), ("log", TensorProto.FLOAT),
        ("empty", TensorProto.FLOAT), ("half", TensorProto.FLOAT16), ("argmax", TensorProto.INT64))]
    zero, one = helper.make_tensor("zero", TensorProto.INT64, [1], [0]), helper.make_tensor("one", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Exp", ["x"], ["e"], name="exp"),
        helper.make_node("Neg", ["e"], ["negated"], name="neg"),
        helper.make_node("Relu", ["negated"], ["hidden"], name="relu"),
        helper.make_node("Sub", ["e", "e"], ["nan"], name="sub"),
        helper.make_node("Log", ["x"], ["log"], name="log"),
        helper.make_node("Slice", ["x", "zero", "zero", "one"], ["empty"], name="slice"),
        helper.make_node("Mul", ["x", "x"], ["square"], name="mul"),
        helper.make_node("Cast", ["square"], ["half"], name="cast", to=TensorProto.FLOAT16),
        helper.make_node("ArgMax", ["x"], ["argmax"], name="argmax", axis=1),
    ]
    graph = helper.make_graph(nodes, "g", [x], outputs, [zero, one])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))


class _NumpyPeak:
    """The reference: max |x| of the tensor as numpy sees it, Inf once any batch held Inf or NaN."""

    def __init__(self) -> None:
        self.peak = 0.0

    def update(self, values: np.ndarray) -> float:
        values = np.asarray(values, dtype=np.float64)
        if values.size:
            self.peak = max(self.peak, float(np.abs(values).max()) if np.isfinite(values).all() else math.inf)
        return self.peak


def _exposed_peaks(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Each probed tensor's peak from the tensor itself: exposed as a graph output, reduced in numpy."""
    from trtopt.executor.session import stream_tensors

    names = probe.probed_tensors(model)
    observers = {name: _NumpyPeak() for name in names}
    stream_tensors(model, names, enumerate(feeds), observers)
    return {name: observer.peak for name, observer in observers.items()}


def test_the_probe_reduces_each_tensor_in_onnx_runtime_to_what_numpy_reads_from_it(monkeypatch):
    feeds = [{"x": np.array(row, np.float32)} for row in ([[1, 2, 3, 4]], [[1, -2, 3, 4], [1, 100, 2, 3]], [[0.5, 1, 1, 2]])]
    expected = _exposed_peaks(_awkward_graph(), feeds)
    returned: list[np.ndarray] = []
    real_run = ort.InferenceSession.run

    def run(self: ort.InferenceSession, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        values = real_run(self, *args, **kwargs)
        returned.extend(values)
        return values

    monkeypatch.setattr(ort.InferenceSession, "run", run)
    ranges = probe.tensor_ranges(_awkward_graph(), feeds)
    assert ranges == expected
    assert {name for name, peak in ranges.items() if peak == math.inf} == {"e", "negated", "nan", "log"}
    assert ranges["empty"] == 0.0 and ranges["half"] == 10000.0 and ranges["argmax"] == 3.0
    assert probe.nonfinite_tensors(_awkward_graph(), feeds) == {"e", "negated", "nan", "log"}
    # No activation is copied out of the session: each float tensor comes back as three scalars.
    assert returned and all(value.size == 1 for value in returned if value.dtype.kind == "f")


def test_the_probe_reads_the_same_peaks_as_the_exported_graph_s_own_tensors():
    # On a real export (LayerNorm, MatMul + Add, Relu, ReduceMean), bit for bit: the reductions
    # only read the tensors, so ONNX Runtime computes them as when they were graph outputs.
    batches = _batches()
    graph = trtopt.compile(Tagger().eval(), (batches[0],), backend="onnxruntime").onnx_model
    feeds = [{graph.graph.input[0].name: b.numpy()} for b in batches]
    assert probe.tensor_ranges(graph, feeds) == _exposed_peaks(graph, feeds)


def _prepared(config: Any, masked: bool = False) -> tuple[onnx.ModelProto, Any]:
    """An exported graph (the Tagger, or an encoder whose padding mask gets the FP16 rewrite) and its data."""
    from tests._models import MaskedEncoder, padding_mask
    from trtopt.precision.pipeline import PreparedData

    if masked:
        torch.manual_seed(0)
        model: nn.Module = MaskedEncoder().eval()
        generator = torch.Generator().manual_seed(1)
        batches: list[Any] = [(torch.randn(4, 10, 32, generator=generator), padding_mask(4, 10)) for _ in range(6)]
    else:
        model, batches = Tagger().eval(), _batches()
    graph = trtopt.compile(model, batches[0] if masked else (batches[0],), backend="onnxruntime").onnx_model
    names = [i.name for i in graph.graph.input]
    feeds = [dict(zip(names, (t.numpy() for t in (b if masked else (b,))))) for b in batches]
    return graph, PreparedData.prepare(graph, config, feeds, None, None)


@pytest.mark.parametrize("smoothquant", [None, 0.85])
def test_int8_measures_the_fp16_float_part_ranges_in_its_last_calibration_pass(monkeypatch, smoothquant):
    # The float part's probe runs the graph that was calibrated last (smoothed or not) on the same
    # batches: the calibration pass measures it too, with the same result as a pass of its own.
    from trtopt.config import BuildConfig
    from trtopt.precision import measured
    from trtopt.precision.pipeline import Int8Builder, calibrate_plan

    config = BuildConfig(precision="int8", smoothquant=smoothquant)
    graph, data = _prepared(config)
    calibrated = calibrate_plan(graph, config, data)
    assert bool(calibrated.smoothed) == (smoothquant is not None)
    assert calibrated.float_ranges == measured.float_part_ranges(calibrated.model, data.batches)
    # Every calibrated range stays within the last bits of a pass that measures it alone.
    alone = trtopt.calibrators.calibrate(
        calibrated.model, list(calibrated.amax), data.calibration_data, input_specs=data.inputs,
        method="minmax", progress=False,
    )
    folded = trtopt.calibrators.calibrate(
        calibrated.model, list(calibrated.amax), data.calibration_data, input_specs=data.inputs,
        method="minmax", progress=False, peaks_for=list(calibrated.float_ranges),
    )
    assert folded.amax == pytest.approx(alone.amax, rel=1e-5)
    probes = []
    monkeypatch.setattr(measured, "tensor_ranges", lambda model, feeds: probes.append(1))
    Int8Builder(calibrated, config, data).build()
    assert probes == []


def test_a_graph_whose_masks_need_the_fp16_rewrite_is_probed_in_a_pass_of_its_own(monkeypatch):
    # The probe measures the mask-safe graph, whose softmax differs on fully masked rows from
    # the graph calibration must see: the calibration pass cannot measure it.
    from trtopt.config import BuildConfig
    from trtopt.precision import measured
    from trtopt.precision.masks import make_masks_fp16_safe
    from trtopt.precision.pipeline import Int8Builder, calibrate_plan

    config = BuildConfig(precision="int8")
    graph, data = _prepared(config, masked=True)
    assert make_masks_fp16_safe(graph)[1].rewrites
    calibrated = calibrate_plan(graph, config, data)
    assert calibrated.float_ranges is None
    probes = []
    real = measured.tensor_ranges
    monkeypatch.setattr(measured, "tensor_ranges", lambda model, feeds: probes.append(1) or real(model, feeds))
    Int8Builder(calibrated, config, data).build()
    assert probes == [1]


def test_the_probe_takes_torch_tensors_as_feeds():
    feeds = [{"x": torch.tensor([[1.0, -5.0, 3.0, 4.0]])}]
    assert probe.tensor_ranges(_awkward_graph(), feeds)["x"] == 5.0


def test_the_budget_search_measures_the_fp16_float_part_ranges_once(monkeypatch):
    # Each module the accuracy-budget search builds keeps other units out of INT8, but its FP16
    # float part is judged on the same FP32 graph's ranges: measured for the first build only
    # (here, where no calibration pass measured them).
    from trtopt.config import BuildConfig
    from trtopt.precision import measured
    from trtopt.precision.pipeline import Int8Builder, calibrate_plan

    config = BuildConfig(precision="int8")
    graph, data = _prepared(config)
    calibrated = calibrate_plan(graph, config, data)
    calibrated.float_ranges = None
    builder = Int8Builder(calibrated, config, data)
    probes = []
    real = measured.tensor_ranges
    monkeypatch.setattr(measured, "tensor_ranges", lambda model, feeds: probes.append(1) or real(model, feeds))
    all_int8 = builder.build()[0]
    one_high = builder.build(frozenset({builder.calibrated.plan.weights[0][0]}))[0]  # a layer kept high
    assert len(probes) == 1
    assert sum(n.op_type == "QuantizeLinear" for n in one_high.graph.node) < sum(
        n.op_type == "QuantizeLinear" for n in all_int8.graph.node
    )
