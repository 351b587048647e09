"""Statistics collection: run the graph under ONNX Runtime and stream activations into observers.

The tensors to measure become the graph's only outputs (ONNX Runtime then
skips whatever they do not need), and each output goes straight into its
observer and is dropped. While the observers digest batch k, ONNX Runtime
already runs batch k+1 on a worker thread (both release the GIL), so at most two
batches' activations are alive: memory stays constant however many batches
run, unlike onnxruntime.quantization's calibrators, which keep every output of
every batch until the end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import onnx

from ..errors import CalibrationError
from .data import Progress

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


class Observer(Protocol):
    def update(self, values: np.ndarray) -> float: ...

    def amax(self) -> float: ...


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = model.graph
    infos = {vi.name: vi for vi in graph.value_info}
    infos.update({vi.name: vi for vi in graph.output})
    infos.update({vi.name: vi for vi in graph.input})
    return infos


def measurement_model(model: onnx.ModelProto, tensor_names: Sequence[str]) -> tuple[onnx.ModelProto | None, list[str]]:
    """A copy of ``model`` whose outputs are the node outputs among ``tensor_names``.

    Returns ``(None, [])`` when every tensor is a graph input (nothing to run).
    Unknown names, weights and non-float tensors are CalibrationErrors.
    """
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
    outputs = [n for n in tensor_names if n not in inputs]
    infos = _value_infos(model)
    if any(n not in infos for n in tensor_names):
        infos = _value_infos(onnx.shape_inference.infer_shapes(model))
    for name in tensor_names:
        info = infos.get(name)
        if info is None or not info.type.HasField("tensor_type"):
            raise CalibrationError(f"tensor {name!r} has no known type, even after ONNX shape inference")
        if info.type.tensor_type.elem_type not in _FLOAT_TYPES:
            kind = onnx.TensorProto.DataType.Name(info.type.tensor_type.elem_type)
            raise CalibrationError(f"tensor {name!r} is {kind}; only floating-point activations are calibrated")
    if not outputs:
        return None, []
    measured = onnx.ModelProto()
    measured.CopyFrom(model)
    del measured.graph.output[:]
    measured.graph.output.extend(infos[n] for n in outputs)
    return measured, outputs


def collect(
    model: onnx.ModelProto,
    observers: Mapping[str, Observer],
    batches: Iterable[tuple[int, dict[str, np.ndarray]]],
    progress: Progress,
) -> int:
    """Feed every batch through the graph into ``observers``; returns the number of batches."""
    from ..backends.onnxruntime import make_session

    measured, outputs = measurement_model(model, list(observers))
    # One core digests batch k while the others run batch k+1 (on 2 cores, 1 ORT thread is also
    # faster per batch than 2 threads contending with the observers).
    threads = max(1, (os.cpu_count() or 2) - 1)
    session = make_session(measured, intra_op_threads=threads) if measured is not None else None
    input_tensors = [n for n in observers if n not in outputs]
    graph_inputs = {i.name for i in session.get_inputs()} if session is not None else set()

    def run(feeds: dict[str, np.ndarray]) -> list[Any]:
        if session is None:
            return []
        return session.run(outputs, {k: v for k, v in feeds.items() if k in graph_inputs})

    def digest(index: int, feeds: dict[str, np.ndarray], future: Future[list[Any]]) -> None:
        for name in input_tensors:
            _observe(observers[name], name, feeds[name], index)
        try:
            values = future.result()
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CalibrationError(f"ONNX Runtime failed on calibration batch {index}: {exc}") from exc
        for name, value in zip(outputs, values):
            _observe(observers[name], name, value, index)

    done = 0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trtopt-calibration") as pool:
            pending = None
            for index, feeds in batches:
                future = pool.submit(run, feeds)  # runs while the previous batch is digested
                if pending is not None:
                    digest(*pending)
                    done += 1
                    progress.update(done)
                pending = (index, feeds, future)
            if pending is not None:
                digest(*pending)
                done += 1
    finally:
        progress.close(done)  # ends the progress line even when a batch is rejected
    return done


def _observe(observer: Observer, name: str, values: np.ndarray, index: int) -> None:
    batch_max = observer.update(values)
    if not np.isfinite(batch_max):
        raise CalibrationError(
            f"tensor {name!r} holds {'NaN' if np.isnan(batch_max) else 'Inf'} in calibration batch "
            f"{index} although the inputs are finite; the model overflows or divides by zero on "
            "this data in FP32 already"
        )
