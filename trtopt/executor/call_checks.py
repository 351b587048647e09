"""What the CPU backend checks and says around a run: embedding indices, and kernel failures.

ONNX Runtime's Gather accepts negative indices (ONNX counts them from the end), so
token id -1 silently reads the last row of an embedding table where eager PyTorch
raises ``IndexError``. The tables that came from ``nn.Embedding`` (the exporter's
module metadata says ``aten.embedding``) are found once per graph, and the graph
inputs that index them are checked before each run. A kernel that fails anyway
is reported with the node, the op and every input's shape instead of ONNX
Runtime's status text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import EngineError, IndexRangeError, first_line

# Ops that pass values through unchanged between a graph input and a Gather's indices.
_VALUE_PRESERVING = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Transpose"})
# ...and between an embedding table's initializer and the Gather (FP16 / weight-only INT8 tables).
_TABLE_PRODUCERS = frozenset({"Cast", "DequantizeLinear", "Identity"})
_ORT_KERNEL = re.compile(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)", re.DOTALL)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


@dataclass(frozen=True)
class EmbeddingIndex:
    """A graph input whose values index the rows of an ``nn.Embedding`` table."""

    input: str
    node: str  # the Gather, named after its torch module (embeddings.word_embeddings/Gather)
    rows: int


def _is_embedding(node: onnx.NodeProto) -> bool:
    return any(
        p.key in ("pkg.torch.onnx.class_hierarchy", "namespace") and "aten.embedding" in p.value
        for p in node.metadata_props
    )


def embedding_indices(model: onnx.ModelProto) -> list[EmbeddingIndex]:
    """Graph inputs that feed (through value-preserving ops) the indices of an embedding's Gather."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {vi.name for vi in graph.input} - set(initializers)
    found = []
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or not _is_embedding(node):
            continue
        table = node.input[0]
        while table not in initializers and table in producers and producers[table].op_type in _TABLE_PRODUCERS:
            table = producers[table].input[0]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table not in initializers or axis != 0:
            continue
        source = node.input[1]
        while source not in inputs and source in producers and producers[source].op_type in _VALUE_PRESERVING:
            source = producers[source].input[0]
        if source in inputs:
            found.append(EmbeddingIndex(source, node.name, int(initializers[table].dims[0])))
    return found


def check_embedding_indices(indices: list[EmbeddingIndex], arrays: Mapping[str, np.ndarray]) -> None:
    """Raise IndexRangeError where an input holds an index outside its embedding table, as eager does."""
    for index in indices:
        values = arrays.get(index.input)
        if values is None or values.size == 0:
            continue
        low, high = values.min(), values.max()
        if low >= 0 and high < index.rows:
            continue
        bad = low if low < 0 else high
        where = tuple(int(i) for i in np.argwhere(values == bad)[0])
        raise IndexRangeError(
            f"input {index.input!r} holds {int(bad)} at {where}, outside the embedding table "
            f"{index.node.rsplit('/', 1)[0]!r} ({index.rows} rows): ids must be 0..{index.rows - 1} "
            "(eager PyTorch raises IndexError here). Check the tokenizer matches the model's vocabulary, and "
            "replace padding ids such as -1 by the model's pad token id"
        )


def kernel_failure(error: BaseException) -> str:
    """ONNX Runtime's run error as ``node 'NAME' (OP) failed: MESSAGE``, else its first line."""
    text = str(error)
    match = _ORT_KERNEL.search(text)
    if match:
        op, node, message = match.groups()
        return f"node {node!r} ({op}) failed: {first_line(Exception(message.strip()))}"
    return _ORT_PREFIX.sub("", first_line(error))


def run_failure(error: BaseException, arrays: Mapping[str, np.ndarray]) -> EngineError:
    """An EngineError naming the failed kernel and the inputs' shapes and dtypes."""
    inputs = ", ".join(f"{name} {tuple(a.shape)} {a.dtype}" for name, a in arrays.items())
    return EngineError(
        f"ONNX Runtime could not run the graph on {inputs}: {kernel_failure(error)}. These shapes are inside "
        "the compiled profiles, which compile checked only at their min, opt and max; the model itself cannot "
        "take them (run the torch model on them to see its own error) or the input values are invalid for it"
    )
