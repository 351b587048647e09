"""Statistics collection: stream activations through the executor into observers.

The executor (``trtopt.executor.session.stream_tensors``) makes the tensors
to measure the graph's only outputs and hands each straight to its observer, one
batch ahead on a worker thread, so memory stays constant however many batches
run, unlike onnxruntime.quantization's calibrators, which keep every output of
every batch until the end. This module adds the calibrator's rules: only float
activations, and an Inf or NaN in the FP32 graph is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..executor.session import FLOAT_TYPES, Observer, stream_tensors, value_infos
from ..errors import CalibrationError
from .data import Progress

logger = logging.getLogger(__name__)

__all__ = ["Observer", "check_tensor_names", "collect"]


def check_tensor_names(model: onnx.ModelProto, tensor_names: Sequence[str]) -> None:
    """Every name must be a float graph input or node output; weights, unknown names and
    non-float tensors are CalibrationErrors."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = {vi.name for vi in graph.input} - initializers
    produced = {name for node in graph.node for name in node.output if name}
    for name in tensor_names:
        if name in initializers:
            raise CalibrationError(
                f"{name!r} is a weight (an initializer), not an activation; weights get per-channel "
                "scales from their values and need no calibration"
            )
        if name not in inputs and name not in produced:
            raise CalibrationError(
                f"tensor {name!r} is neither a graph input nor a node output of this graph; "
                "pass names from the cleaned graph (trtopt.graph.cleanup renames nothing it keeps)"
            )
    infos = value_infos(model)
    if any(n not in infos for n in tensor_names):
        infos = value_infos(onnx.shape_inference.infer_shapes(model))
    for name in tensor_names:
        info = infos.get(name)
        if info is None or not info.type.HasField("tensor_type"):
            raise CalibrationError(f"tensor {name!r} has no known type, even after ONNX shape inference")
        if info.type.tensor_type.elem_type not in FLOAT_TYPES:
            kind = onnx.TensorProto.DataType.Name(info.type.tensor_type.elem_type)
            raise CalibrationError(f"tensor {name!r} is {kind}; only floating-point activations are calibrated")


def collect(
    model: onnx.ModelProto,
    observers: Mapping[str, Observer],
    batches: Iterable[tuple[int, dict[str, np.ndarray]]],
    progress: Progress,
    peaks: dict[str, float] | None = None,
) -> int:
    """Feed every batch through the graph into ``observers``; returns the number of batches.
    ``peaks``: more tensors' max |x|, measured in the same pass (``stream_tensors``)."""
    names = list(observers)
    check_tensor_names(model, names)
    graph = model.graph
    known = {vi.name for vi in graph.input} | {name for node in graph.node for name in node.output}
    unknown = [n for n in peaks or {} if n not in known]
    if unknown:
        raise CalibrationError(f"tensor(s) {unknown[:5]} to measure max |x| of are neither graph inputs nor node outputs")
    done = 0

    def advanced(count: int) -> None:
        nonlocal done
        done = count
        progress.update(count)

    try:
        done = stream_tensors(
            model, names, batches, observers, check=reject_nonfinite, on_batch=advanced, peaks=peaks
        )
    finally:
        progress.close(done)  # ends the progress line even when a batch is rejected
    return done


def reject_nonfinite(name: str, batch_max: float, index: int) -> None:
    """Calibration needs finite FP32 activations: Inf or NaN there is the model's or the data's fault."""
    if not np.isfinite(batch_max):
        raise CalibrationError(
            f"tensor {name!r} holds {'NaN' if np.isnan(batch_max) else 'Inf'} in calibration batch "
            f"{index} although the inputs are finite; the model overflows or divides by zero on "
            "this data in FP32 already"
        )
