"""ONNX graph cleanup with onnx-graphsurgeon and Polygraphy, plus ONNX file helpers.

Node metadata (the torch module path of each node) survives cleanup; it is
what ``trtopt.names.assign_names`` then names the nodes after.

Cleanup never changes what the graph computes: it removes no-op nodes
(Identity, inference-mode Dropout), folds constant subgraphs, drops dead nodes,
sorts topologically, then runs strict shape inference and the ONNX checker so
that a broken graph fails here, with ONNX's message, not inside TensorRT.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from polygraphy.backend.onnx import fold_constants, infer_shapes
from polygraphy.logger import G_LOGGER

from .errors import GraphError
from .files import atomic_path
from .names import carry_metadata

logger = logging.getLogger(__name__)

# From this many bytes of initializers on, a model's weights leave the proto: they live in a file
# (see "weights on disk" below) through every stage, each pass reading and writing one weight at
# a time. Needed below protobuf's 2 GiB limit; chosen far below it because the proto path holds
# several copies at once (graphsurgeon and Polygraphy round trips, protobuf's serialisation):
# a 0.5 GiB model compiled at 12x its weights in the proto, 4x on disk. Smaller models keep the
# proto (no data file beside an exported graph, module file version 1). Read at call time, so
# tests can lower it.
EXTERNAL_DATA_THRESHOLD = 256 * 2**20
# Initializers smaller than this stay inside the proto even then (shapes, scales, small constants).
EXTERNAL_TENSOR_MIN_BYTES = 1024
# Each tensor starts at a multiple of this in the data file, so a reader may memory-map it.
EXTERNAL_DATA_ALIGNMENT = 4096


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
    """Strict shape inference plus the ONNX checker; returns the model with shapes inferred.

    A model whose weights are on disk (``weights_dir``) is checked from a file in that
    directory, so the checker finds its data files; the proto itself stays small.
    """
    directory = weights_dir(model)
    if directory is None and initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        # Weights inside a proto over protobuf's limit: inference needs a file; Polygraphy's makes one.
        return infer_shapes(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        if directory is None:
            onnx.checker.check_model(model, full_check=True)
        else:
            path = directory / f"check-{uuid.uuid4().hex}.onnx"
            try:
                onnx.save_model(model, str(path))
                onnx.checker.check_model(str(path), full_check=True)
            finally:
                path.unlink(missing_ok=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphError(f"the ONNX graph is invalid: {exc}") from exc
    return model


def _with_foldable_weights_loaded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or for a model with weights on disk a copy with the weights that constant folding
    reads (those of nodes whose inputs are all constant, e.g. a Transpose of a weight) back in the
    proto: Polygraphy and graphsurgeon evaluate folded nodes in an ONNX Runtime session made from
    the proto alone, which cannot find the weights directory. The rest stays on disk."""
    if weights_dir(model) is None:
        return model
    constant = {t.name for t in model.graph.initializer}
    needed: set[str] = set()
    for node in model.graph.node:  # topologically sorted (ONNX requires it)
        inputs = [name for name in node.input if name]
        if inputs and all(name in constant for name in inputs) or not inputs and node.op_type == "Constant":
            needed.update(inputs)
            constant.update(node.output)
    tensors = [t for t in _external_tensors(model) if t.name in needed]
    if not tensors:
        return model
    loaded = onnx.ModelProto()
    loaded.CopyFrom(model)  # small: the weights are not in it
    by_name = {t.name: t for t in loaded.graph.initializer}
    for tensor in tensors:
        by_name[tensor.name].CopyFrom(onnx.numpy_helper.from_array(read_weight(model, tensor), tensor.name))
    return loaded


def cleanup(model: onnx.ModelProto) -> tuple[onnx.ModelProto, CleanupReport]:
    """Return a cleaned copy of ``model`` and a report of what changed."""
    before = [n.name for n in model.graph.node]
    exported = model
    model = _with_foldable_weights_loaded(model)
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
    # graphsurgeon and Polygraphy drop node metadata (the torch module paths come back by node name)
    # and the model's, which says where weights on disk live.
    model = gs.export_onnx(graph)
    keep_weights_dir(exported, model)
    if weights_dir(model) is not None:
        model = offload_weights(model)  # what folding computed from weights goes to disk too
    model = carry_metadata(exported, check_model(model))
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


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's values, without reading them from disk when they are external."""
    if _is_external(tensor):
        info = _external_info(tensor)
        if "length" in info:
            return int(info["length"])
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(tensor_bytes(t) for t in model.graph.initializer)


# ------------------------------------------------------------ weights on disk
#
# A model over EXTERNAL_DATA_THRESHOLD keeps its weights in a data file of a temporary
# directory trtopt owns, from right after export to the module that runs it: the proto that
# every pass handles holds only the graph and small tensors, each big initializer points into
# the file (ONNX external data), and the model's metadata names the directory. ONNX Runtime reads
# the file itself; save, export_onnx, Triton and the TensorRT parser copy it in chunks. So the
# weights are never held as a protobuf copy besides the one the runtime makes.

WEIGHTS_DIR_KEY = "trtopt.weights_dir"
_owners_lock = threading.Lock()
_owners: dict[str, int] = {}  # weights directory -> number of live objects that keep it


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s weights are too big to stay inside its proto (``EXTERNAL_DATA_THRESHOLD``)."""
    return initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD


def weights_dir(model: onnx.ModelProto) -> Path | None:
    """The directory holding ``model``'s external weights, or None when they are all in the proto."""
    for entry in model.metadata_props:
        if entry.key == WEIGHTS_DIR_KEY:
            return Path(entry.value)
    return None


def set_weights_dir(model: onnx.ModelProto, directory: Path | None) -> None:
    """Record (or, with None, remove) where ``model``'s external weights are."""
    kept = [(e.key, e.value) for e in model.metadata_props if e.key != WEIGHTS_DIR_KEY]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    if directory is not None:
        model.metadata_props.add(key=WEIGHTS_DIR_KEY, value=str(directory))


def keep_weights_dir(source: onnx.ModelProto, result: onnx.ModelProto) -> onnx.ModelProto:
    """Give ``result`` (from a pass that drops model metadata) ``source``'s weights directory."""
    directory = weights_dir(source)
    if directory is not None and weights_dir(result) is None:
        set_weights_dir(result, directory)
    return result


def new_weights_dir() -> Path:
    """A temporary directory for a model's weights; ``hold_weights_dir`` ties its life to objects."""
    directory = Path(tempfile.mkdtemp(prefix="trtopt-weights-"))
    with _owners_lock:
        _owners[str(directory)] = 0
    return directory


def _release(directory: str) -> None:
    with _owners_lock:
        _owners[directory] -= 1
        if _owners[directory] > 0:
            return
        del _owners[directory]
    shutil.rmtree(directory, ignore_errors=True)


def hold_weights_dir(owner: object, model: onnx.ModelProto) -> None:
    """Keep ``model``'s weights directory (one trtopt made) until ``owner`` is collected."""
    directory = weights_dir(model)
    if directory is None:
        return
    with _owners_lock:
        if str(directory) not in _owners:
            return  # not trtopt's temporary directory: never delete it
        _owners[str(directory)] += 1
    weakref.finalize(owner, _release, str(directory))


def discard_weights_dir(directory: Path | None) -> None:
    """Delete a temporary weights directory now, unless an object holds it (a failed compile or load)."""
    if directory is None:
        return
    with _owners_lock:
        if _owners.get(str(directory)) != 0:
            return
        del _owners[str(directory)]
    shutil.rmtree(directory, ignore_errors=True)


def prune_weights_dir(model: onnx.ModelProto) -> int:
    """Delete the files of ``model``'s (trtopt-made) weights directory that its graph does not use;
    returns how many.

    Every pass writes the tensors it changes as new files, and every session's FP16 emulation
    its FP32 copies: left alone, they would keep several times the weights on disk for the life
    of the module. Sessions made already keep reading what they loaded (POSIX keeps an unlinked
    file's data while it is open or mapped); a file the OS will not delete now stays.
    """
    directory = weights_dir(model)
    with _owners_lock:
        if directory is None or str(directory) not in _owners:
            return 0  # not trtopt's temporary directory: never touch it
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS, onnx.AttributeProto.TENSOR)
           for node in model.graph.node for a in node.attribute):
        return 0  # tensors beyond the initializers might point at files too: keep them all
    used = {_external_info(t).get("location") for t in _external_tensors(model)}
    removed = 0
    for path in directory.iterdir():
        if path.is_file() and path.name not in used:
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


@atexit.register
def _remove_unheld_weights_dirs() -> None:
    """Directories no object ever held (a graph read and dropped) go at exit; held ones go with their holders."""
    with _owners_lock:
        unheld = [d for d, count in _owners.items() if count == 0]
    for directory in unheld:
        shutil.rmtree(directory, ignore_errors=True)


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from (t for t in model.graph.initializer if _is_external(t))


def _pad_to_alignment(handle: Any) -> None:
    gap = -handle.tell() % EXTERNAL_DATA_ALIGNMENT
    if gap:
        handle.write(b"\0" * gap)


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    """Copy every set field of the protobuf message ``source`` into ``target`` except ``skip``."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.label == field.LABEL_REPEATED:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def offload_weights(model: onnx.ModelProto, directory: Path | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose big initializers are in a new data file in ``directory``.

    ``directory`` defaults to the model's weights directory, else a new temporary one.
    The copy is built tensor by tensor (``model`` is not changed), so at no time is there
    a second copy of the weights in memory, only one tensor's bytes while it is written.
    """
    directory = directory or weights_dir(model) or new_weights_dir()
    name = f"weights-{uuid.uuid4().hex[:12]}.bin"
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    with open(directory / name, "wb") as handle:
        for source in model.graph.initializer:
            tensor = out.graph.initializer.add()
            if _is_external(source) or tensor_bytes(source) < EXTERNAL_TENSOR_MIN_BYTES:
                tensor.CopyFrom(source)
                continue
            if source.HasField("raw_data"):
                _copy_fields(source, tensor, skip="raw_data")
                data = source.raw_data
            else:  # typed fields (float_data, ...): stored as raw bytes like every other weight
                tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(source), source.name))
                data = tensor.raw_data
                tensor.ClearField("raw_data")
            _pad_to_alignment(handle)
            offset = handle.tell()
            handle.write(data)
            del data
            _point_at(tensor, name, offset, handle.tell() - offset)
    set_weights_dir(out, directory)
    return out


def _read_external(tensor: onnx.TensorProto, directory: Path) -> np.ndarray:
    """An external tensor's values, read from its file in ``directory`` into a new writable array."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    info = _external_info(tensor)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if dtype.kind not in "biuf" or dtype.byteorder == ">" or sys.byteorder == "big" or "length" in info and (
        int(info["length"]) != count * dtype.itemsize
    ):
        # ONNX-only types (bfloat16, float8, packed int4) and odd layouts: onnx's own reader.
        return np.array(onnx.numpy_helper.to_array(tensor, base_dir=str(directory)))
    with open(directory / info["location"], "rb") as handle:
        handle.seek(int(info.get("offset", 0)))
        values = np.fromfile(handle, dtype=dtype, count=count)
    if values.size != count:
        raise GraphError(f"{info['location']} ends inside weight {tensor.name!r}; the weights directory is damaged")
    return values.reshape(tuple(tensor.dims))


def read_weight(model: onnx.ModelProto, tensor: onnx.TensorProto) -> np.ndarray:
    """The values of one initializer of ``model``, from its weights directory when it is external."""
    if not _is_external(tensor):
        return onnx.numpy_helper.to_array(tensor)
    directory = weights_dir(model)
    if directory is None:
        raise GraphError(
            f"initializer {tensor.name!r} is stored outside the model, and the model does not say where; "
            "load the ONNX file with its data files (onnx.load(path)) before passing it"
        )
    return _read_external(tensor, directory)


def _store_tensor(directory: Path | None, values: np.ndarray, name: str) -> onnx.TensorProto:
    native = values.dtype.kind in "biuf" and values.dtype.isnative and sys.byteorder == "little"
    if directory is None or values.nbytes < EXTERNAL_TENSOR_MIN_BYTES or not native:
        return onnx.numpy_helper.from_array(values, name)
    # The bytes go straight to the file: through from_array's raw_data they would stay in the
    # message's protobuf arena (a cleared field's memory is freed only with the message).
    location = f"weights-{uuid.uuid4().hex[:12]}.bin"
    with open(directory / location, "wb") as handle:
        handle.write(np.ascontiguousarray(values).data)
    tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype))
    tensor.dims.extend(values.shape)
    _point_at(tensor, location, 0, values.nbytes)
    return tensor


def store_weight(model: onnx.ModelProto, values: np.ndarray, name: str) -> onnx.TensorProto:
    """An initializer ``name`` holding ``values`` for ``model``: written to a new file in the
    model's weights directory when its weights are on disk (so a pass that rewrites weights
    one at a time never holds them all), else inside the proto."""
    return _store_tensor(weights_dir(model), values, name)


# ------------------------------------------------- graphsurgeon over weights on disk
#
# onnx-graphsurgeon reads an initializer lazily (LazyValues) but relative to the working
# directory, and caches what it read in the graph, whose export then holds it in the proto.
# The passes therefore import through ``import_graph`` (external initializers read from the
# weights directory), read big constants through ``constant_values`` (not cached: one tensor
# at a time), make new ones through ``new_constant`` (written to the directory) and export
# through ``export_graph`` (the result keeps the directory). On a model without weights on
# disk these behave as graphsurgeon does, so both paths give the same graphs.


class _ExternalValues(gs.ir.tensor.LazyValues):
    """graphsurgeon's lazy values of an initializer in a weights directory; exported as the
    reference to its file it is, unless a pass replaced the values."""

    def __init__(self, tensor: onnx.TensorProto, directory: Path) -> None:
        super().__init__(tensor)
        self.directory = directory

    def load(self) -> np.ndarray:
        return _read_external(self.tensor, self.directory)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx(model)``, with ``model``'s external initializers read from its weights directory."""
    graph = gs.import_onnx(model)
    directory = weights_dir(model)
    if directory is not None:
        for tensor in graph.tensors().values():
            lazy = getattr(tensor, "_values", None)
            if isinstance(lazy, gs.ir.tensor.LazyValues) and _is_external(lazy.tensor):
                tensor._values = _ExternalValues(lazy.tensor, directory)
    return graph


def export_graph(graph: gs.Graph, source: onnx.ModelProto) -> onnx.ModelProto:
    """``gs.export_onnx(graph)`` for a graph ``import_graph`` read from ``source``: keeps its weights directory."""
    return keep_weights_dir(source, gs.export_onnx(graph))


def constant_values(constant: gs.Constant) -> np.ndarray:
    """A constant's values, read without caching them in the graph (a weight read once stays on disk)."""
    lazy = constant._values
    return lazy.load() if isinstance(lazy, gs.ir.tensor.LazyValues) else constant.values


def new_constant(model: onnx.ModelProto, name: str, values: np.ndarray) -> gs.Constant:
    """A graphsurgeon constant for a pass's new weight of ``model``: on disk (``store_weight``)
    when ``model``'s weights are, else ``gs.Constant(name, values)`` as usual."""
    directory = weights_dir(model)
    if directory is None or values.nbytes < EXTERNAL_TENSOR_MIN_BYTES or values.dtype.kind not in "biuf":
        return gs.Constant(name, values)  # small, or a type graphsurgeon exports itself (FP8)
    return gs.Constant(name, _ExternalValues(_store_tensor(directory, values, name), directory))


def load_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every weight in the proto (for passes that rewrite weights)."""
    loaded = onnx.ModelProto()
    loaded.CopyFrom(model)
    directory = weights_dir(loaded)
    if directory is not None:
        for tensor in _external_tensors(loaded):
            values = read_weight(model, tensor)
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
        set_weights_dir(loaded, None)
    return loaded


def _copy_range(source: Any, target: Any, offset: int, length: int, chunk: int = 1 << 24) -> None:
    source.seek(offset)
    while length > 0:
        block = source.read(min(chunk, length))
        if not block:
            raise GraphError(f"{source.name} ends before its last weight; the weights directory is damaged")
        target.write(block)
        length -= len(block)


def write_external_copy(model: onnx.ModelProto, target: Any, data_name: str) -> onnx.ModelProto:
    """Copy ``model``'s external weights (from its weights directory), in chunks, into the open
    binary file ``target``; return a copy of the proto pointing at them as ``data_name``, naming
    no temporary directory. Neither side ever holds more than a chunk of the weights."""
    directory = weights_dir(model)
    if directory is None:
        raise GraphError("write_external_copy needs a model whose weights are on disk (see offload_weights)")
    proto = onnx.ModelProto()
    proto.CopyFrom(model)  # small: the weights are not in it
    set_weights_dir(proto, None)
    sources: dict[str, Any] = {}
    try:
        for tensor in _external_tensors(proto):
            info = _external_info(tensor)
            location = info["location"]
            if location not in sources:
                sources[location] = open(directory / location, "rb")
            length = tensor_bytes(tensor)
            _pad_to_alignment(target)
            offset = target.tell()
            _copy_range(sources[location], target, int(info.get("offset", 0)), length)
            _point_at(tensor, data_name, offset, length)
    finally:
        for handle in sources.values():
            handle.close()
    return proto


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited_key(message: Any, field: str) -> bytes:
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)


def serialized_parts(model: onnx.ModelProto) -> Iterator[bytes]:
    """``model``'s protobuf encoding in pieces, one initializer at a time.

    Joined, the pieces parse to ``model`` (protobuf reads fields in any order). protobuf's
    own ``SerializeToString`` needs about 4x the message in memory while it grows its buffer;
    this needs one tensor's worth at a time, and a caller that needs one ``bytes`` (ONNX
    Runtime) pays for exactly that by joining.
    """
    head = onnx.ModelProto()
    _copy_fields(model, head, skip="graph")
    skeleton = onnx.GraphProto()
    _copy_fields(model.graph, skeleton, skip="initializer")
    skeleton_bytes = skeleton.SerializeToString()
    init_key = _length_delimited_key(skeleton, "initializer")
    raw_key = _length_delimited_key(onnx.TensorProto(), "raw_data")
    # Each initializer: its fields but raw_data, then raw_data's key, length and bytes as they are.
    tensor_heads = []
    for tensor in model.graph.initializer:
        bare = onnx.TensorProto()
        _copy_fields(tensor, bare, skip="raw_data")
        raw_size = len(tensor.raw_data) if tensor.HasField("raw_data") else None
        tensor_heads.append((bare.SerializeToString(), raw_size))
    sizes = [len(h) + (0 if n is None else len(raw_key) + len(_varint(n)) + n) for h, n in tensor_heads]
    graph_size = len(skeleton_bytes) + sum(len(init_key) + len(_varint(n)) + n for n in sizes)
    yield head.SerializeToString()
    yield _length_delimited_key(head, "graph") + _varint(graph_size)
    yield skeleton_bytes
    for tensor, (bare, raw_size), size in zip(model.graph.initializer, tensor_heads, sizes):
        yield init_key + _varint(size) + bare
        if raw_size is not None:
            yield raw_key + _varint(raw_size)
            yield tensor.raw_data


def serialize(model: onnx.ModelProto) -> bytes:
    """``model`` as one ``bytes`` (what ONNX Runtime takes), built without protobuf's 4x buffer growth."""
    return b"".join(serialized_parts(model))


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` atomically; weights go to ``<name>.data`` beside it from 256 MiB
    (``EXTERNAL_DATA_THRESHOLD``) or when they are on disk already (``weights_dir``)."""
    path = Path(path)
    data_name = f"{path.name}.data"
    if weights_dir(model) is not None:
        # The data file is in place before the proto that names it.
        with atomic_path(path) as tmp, atomic_path(path.parent / data_name) as tmp_data:
            with open(tmp_data, "wb") as target:
                proto = write_external_copy(model, target, data_name)
                target.flush()
                os.fsync(target.fileno())
            onnx.save_model(proto, str(tmp))
        return path
    external = needs_external_data(model)
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
                location=data_name,
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
