"""Measure max |x| of every float activation of a graph on calibration batches.

The FP16 keep-list needs the plain peak of every float tensor (not a clipped
calibration amax), and checking a converted graph for Inf/NaN needs the same
run on the converted graph. Both reduce every tensor inside ONNX Runtime
(``stream_tensors``' ``peaks``, ``with_peaks``) instead of copying each out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from ..executor.session import stream_tensors
from ..errors import CalibrationError

# The tensors TensorRT may store in FP16 or FP32: the ones the keep-list judges.
FP16_CANDIDATE_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def probed_tensors(model: onnx.ModelProto) -> list[str]:
    """The graph outputs, every FP32/FP16 activation, then the float graph inputs (their
    consumers may need FP32 too), in the order ``tensor_ranges`` reports them."""
    graph = model.graph
    names = list(dict.fromkeys(o.name for o in graph.output))
    weights = _dequantized_weights(graph)
    names += [
        vi.name for vi in graph.value_info
        if vi.type.tensor_type.elem_type in FP16_CANDIDATE_TYPES and vi.name not in weights
    ]
    initializers = {t.name for t in graph.initializer}
    names += [vi.name for vi in graph.input if vi.name not in initializers and _is_float(vi)]
    return list(dict.fromkeys(names))


def _dequantized_weights(graph: onnx.GraphProto) -> set[str]:
    """Outputs of a DequantizeLinear of a weight (an initializer), and of Casts of them.

    Not probed: they are the same on every batch and each is as big as its weight, so exposing
    them held every weight dequantized twice over while the batches streamed (the Q/DQ graph's
    check: 4x its weights). Their peaks are known without running anything
    (``Int8Report.dq_peaks``, which the FP16 keep-list reads), so one that FP16 cannot hold is
    kept in FP32 before any check runs.
    """
    initializers = {t.name for t in graph.initializer}
    found: set[str] = set()
    for node in graph.node:  # sorted: a Cast follows the DequantizeLinear it reads
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] in initializers:
            found.update(node.output)
        elif node.op_type == "Cast" and node.input and node.input[0] in found:
            found.update(node.output)
    return found


def _is_float(info: onnx.ValueInfoProto) -> bool:
    elem = info.type.tensor_type.elem_type
    return elem != onnx.TensorProto.UNDEFINED and onnx.helper.tensor_dtype_to_np_dtype(elem).kind == "f"


def tensor_ranges(
    model: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """Map each float activation (and graph output) to max |x| over ``batches``.

    A tensor that held Inf or NaN in any batch maps to ``math.inf``. ``model``
    must carry inferred value_info (``trtopt.graph.check_model`` adds it). A graph
    with FP16 tensors is measured as TensorRT computes it (the executor emulates FP16).
    """
    return _peaks(model, batches)


def nonfinite_tensors(model: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]]) -> set[str]:
    """The tensors ``tensor_ranges`` would map to ``math.inf``: those that held Inf or NaN in any batch."""
    return {name for name, peak in _peaks(model, batches).items() if peak == math.inf}


def _peaks(model: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Each probed tensor's max |x| over ``batches``, measured inside ONNX Runtime."""
    peaks = dict.fromkeys(probed_tensors(model), 0.0)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [vi.name for vi in model.graph.input if vi.name not in initializers]
    feeds = ({n: np.asarray(batch[n]) for n in inputs} for batch in batches)  # torch tensors too
    if stream_tensors(model, [], enumerate(feeds), {}, peaks=peaks) == 0:
        raise CalibrationError("the calibration data yielded no batches; pass at least one batch")
    return peaks
