"""ONNX graph cleanup with onnx-graphsurgeon and Polygraphy, plus ONNX file helpers.

Node metadata (the torch module path of each node) survives cleanup; it is
what ``trtopt.names.assign_names`` then names the nodes after.

Cleanup never changes what the graph computes: it removes no-op nodes
(Identity, inference-mode Dropout), folds constant subgraphs, drops dead nodes,
sorts topologically, then runs strict shape inference and the ONNX checker so
that a broken graph fails here, with ONNX's message, not inside TensorRT.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import GraphError
from .files import atomic_path
from .names import carry_metadata

logger = logging.getLogger(__name__)

# protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass(frozen=True)
class CleanupReport:
    nodes_before: int
    nodes_after: int
    removed_noops: tuple[str, ...]
    folded: tuple[str, ...]  # nodes replaced by constants or dropped as dead code

    def summary(self) -> str:
        return (
            f"{self.nodes_before} -> {self.nodes_after} nodes "
            f"({len(self.removed_noops)} no-ops removed, {len(self.folded)} folded or dead)"
        )


def _is_noop(node: gs.Node, graph: gs.Graph) -> bool:
    if node.op not in ("Identity", "Dropout") or not node.inputs or not node.outputs:
        return False
    if node.op == "Dropout":
        if len(node.outputs) > 1 and (node.outputs[1].outputs or node.outputs[1] in graph.outputs):
            return False  # someone reads the mask
        if len(node.inputs) > 2:
            training = node.inputs[2]
            if not isinstance(training, gs.Constant) or bool(np.asarray(training.values)):
                return False  # training mode decided at run time, or on
    # Renaming a graph output would change the module's interface.
    return node.outputs[0] not in graph.outputs


def remove_noops(graph: gs.Graph) -> list[str]:
    """Bypass Identity and inference Dropout nodes; return their names."""
    removed = []
    for node in list(graph.nodes):
        if not _is_noop(node, graph):
            continue
        source, target = node.inputs[0], node.outputs[0]
        for consumer in list(target.outputs):
            for i, tensor in enumerate(consumer.inputs):
                if tensor is target:
                    consumer.inputs[i] = source
        node.outputs.clear()
        removed.append(node.name)
    return removed


def check_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strict shape inference plus the ONNX checker; returns the model with shapes inferred."""
    if initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        # Both need a file for large models; inference then is Polygraphy's job.
        from polygraphy.backend.onnx import infer_shapes

        return infer_shapes(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphError(f"the ONNX graph is invalid: {exc}") from exc
    return model


def cleanup(model: onnx.ModelProto) -> tuple[onnx.ModelProto, CleanupReport]:
    """Return a cleaned copy of ``model`` and a report of what changed."""
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    before = [n.name for n in model.graph.node]
    exported = model
    graph = gs.import_onnx(model)
    removed = remove_noops(graph)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    after_noops = [n.name for n in model.graph.node]
    # Polygraphy repeats graphsurgeon's folding with shape inference until nothing changes.
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        model = fold_constants(model, num_passes=None, copy=False, error_ok=True)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    # graphsurgeon and Polygraphy drop node metadata: the torch module paths come back by node name.
    model = carry_metadata(exported, check_model(gs.export_onnx(graph)))
    remaining = {n.name for n in model.graph.node}
    report = CleanupReport(
        nodes_before=len(before),
        nodes_after=len(model.graph.node),
        removed_noops=tuple(removed),
        folded=tuple(n for n in after_noops if n not in remaining),
    )
    logger.info("graph cleanup: %s", report.summary())
    return model, report


# ---------------------------------------------------------------- file helpers


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` atomically; weights go to ``<name>.data`` beside it above ~2 GB."""
    path = Path(path)
    external = initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    with atomic_path(path) as tmp:
        if external:
            # onnx.save_model moves the weights out of the proto it is given (raw_data cleared,
            # pointing at the file); save a copy so the caller's model keeps its weights.
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(
                copy,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{path.name}.data",
                size_threshold=0,
            )
        else:
            onnx.save_model(model, str(tmp))
    return path


def graph_input_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Each graph input's dims: int when static, the symbol ('' if unnamed) when dynamic."""
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        shapes[vi.name] = [
            d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in vi.type.tensor_type.shape.dim
        ]
    return shapes
