"""The ONNX Runtime executor: one way to run a graph on the CPU and stream its tensors into observers."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from trtopt.executor.session import run_graph, stream_tensors
from trtopt.calibrators.collect import reject_nonfinite
from trtopt.errors import CalibrationError
from trtopt.precision import tensor_ranges


def exp_graph() -> onnx.ModelProto:
    """y = exp(x) * 2: exp overflows FP32 for x > 88."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Exp", ["x"], ["e"], name="exp"), helper.make_node("Mul", ["e", "two"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "g", [x], [y], [two])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))


class MaxAbsObserver:
    """A test double of a calibrator's observer: max |x| over the batches it is fed."""

    def __init__(self) -> None:
        self.peak = 0.0

    def update(self, values: np.ndarray) -> float:
        batch_max = float(np.abs(values).max())
        self.peak = max(self.peak, batch_max)
        return batch_max


def batches(*rows: float) -> list[dict[str, np.ndarray]]:
    return [{"x": np.full((1, 2), r, np.float32)} for r in rows]


def test_run_graph_concatenates_each_output_over_the_batches():
    (y,) = run_graph(exp_graph(), batches(0.0, 1.0))
    np.testing.assert_allclose(y, [[2.0, 2.0], [2 * math.e, 2 * math.e]], rtol=1e-6)


def test_the_probe_records_inf_where_the_calibrator_rejects_it():
    ranges = tensor_ranges(exp_graph(), batches(1.0, 100.0))
    assert ranges["x"] == 100.0 and ranges["e"] == ranges["y"] == math.inf
    observers = {"e": MaxAbsObserver()}
    with pytest.raises(CalibrationError, match="'e' holds Inf in calibration batch 1"):
        stream_tensors(exp_graph(), ["e"], enumerate(batches(1.0, 100.0)), observers, check=reject_nonfinite)


def test_stream_tensors_feeds_graph_inputs_and_outputs_into_their_observers():
    observers = {"x": MaxAbsObserver(), "e": MaxAbsObserver()}
    done = stream_tensors(exp_graph(), ["x", "e"], enumerate(batches(-3.0, 2.0)), observers)
    assert done == 2 and observers["x"].peak == 3.0 and observers["e"].peak == pytest.approx(math.exp(2.0))
