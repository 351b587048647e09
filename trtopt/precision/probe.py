"""Measure max |x| of every float activation of a graph on calibration batches.

The FP16 keep-list needs the plain peak of every float tensor (not a clipped
calibration amax), and checking a converted graph for Inf/NaN needs the same
run on the converted graph; this does both in one streaming pass under ONNX
Runtime, keeping one number per tensor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from ..backends.onnxruntime import make_session
from ..errors import CalibrationError
from ..module import TensorSpec

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _expose_float_tensors(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs include every float activation it computes."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for vi in probe.graph.value_info:
        if vi.type.tensor_type.elem_type in _FLOAT_TYPES and vi.name not in outputs:
            probe.graph.output.append(vi)
            outputs.add(vi.name)
    return probe


def tensor_ranges(
    model: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """Map each float activation (and graph output) to max |x| over ``batches``.

    A tensor that held Inf or NaN in any batch maps to ``math.inf``. ``model``
    must carry inferred value_info (``trtopt.graph.check_model`` adds it).
    """
    session = make_session(_expose_float_tensors(model))
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    peaks = dict.fromkeys(names, 0.0)
    seen = 0
    for batch in batches:
        feeds = {n: np.asarray(batch[n]) for n in inputs}
        for name, value in feeds.items():  # graph inputs: their consumers may need FP32 too
            if value.dtype.kind == "f" and value.size:
                peak = float(np.max(np.abs(value))) if np.all(np.isfinite(value)) else math.inf
                peaks[name] = max(peaks.get(name, 0.0), peak)
        for name, value in zip(names, session.run(names, feeds)):
            value = np.asarray(value)
            if value.size == 0:
                continue
            if not np.all(np.isfinite(value)):
                peaks[name] = math.inf
            else:
                peaks[name] = max(peaks[name], float(np.max(np.abs(value))))
        seen += 1
    if seen == 0:
        raise CalibrationError("the calibration data yielded no batches; pass at least one batch")
    return peaks


def feed_batches(
    data: Any, input_specs: Sequence[TensorSpec], max_batches: int | None = None
) -> tuple[Any, Callable[[], Iterator[dict[str, np.ndarray]]]]:
    """Re-iterable ONNX Runtime feeds from user calibration data (the calibrators' rules).

    Returns ``(data, batches)``: a one-shot iterator (a generator) is read once
    into a list, because the calibrator and the passes each read the data, so
    pass the returned ``data`` on to ``calibrate``.
    """
    from ..calibrators.data import iter_batches

    if isinstance(data, Iterator):
        data = list(itertools.islice(data, max_batches))

    def batches() -> Iterator[dict[str, np.ndarray]]:
        return (feeds for _, feeds in iter_batches(data, input_specs, max_batches))

    return data, batches


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An FP32 graph that rounds every FP16 tensor of ``model`` to FP16, for running on a CPU.

    ONNX Runtime's CPU provider has no FP16 kernel for most ops: it computes
    them in FP32 and drops the Casts between them, so an FP16 graph's
    intermediate overflow and rounding do not show there. TensorRT stores each
    FP16 tensor in FP16. This copy computes every op in FP32 but sends each
    FP16 tensor through an explicit Cast to FP16 and back, which ONNX Runtime
    keeps; the values it sees are the FP16 values TensorRT would see. A graph
    without FP16 tensors is returned as is.
    """
    half = onnx.TensorProto.FLOAT16
    half_tensors = {
        vi.name for vi in [*model.graph.value_info, *model.graph.output] if vi.type.tensor_type.elem_type == half
    }
    if not half_tensors:
        return model
    emulated = onnx.ModelProto()
    emulated.CopyFrom(model)
    graph = emulated.graph
    for init in graph.initializer:
        if init.data_type == half:  # FP16 values are exact in FP32
            values = onnx.numpy_helper.to_array(init).astype(np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == half:
                attr.i = onnx.TensorProto.FLOAT
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name in half_tensors:
                wide, rounded = f"{name}__fp32", f"{name}__as_fp16"
                node.output[i] = wide
                nodes.append(onnx.helper.make_node("Cast", [wide], [rounded], to=half))
                nodes.append(onnx.helper.make_node("Cast", [rounded], [name], to=onnx.TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    for vi in [*graph.value_info, *graph.output]:  # same names, now FP32 holding FP16 values
        if vi.type.tensor_type.elem_type == half:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return emulated
