"""The compiled module: one torch-like callable over any backend, plus save/load.

Inputs are validated here, once, for every backend: names, dtype, rank and the
optimization profile that contains the shapes. The backend then only runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ._version import __version__
from .backends.runner import Runner
from .profiles import ShapeProfile
from .errors import InputError, ModuleFileError, ShapeError
from .files import atomic_path
from .graph import (
    discard_weights_dir,
    hold_weights_dir,
    new_weights_dir,
    serialized_parts,
    set_weights_dir,
    weights_dir,
    write_external_copy,
)
from .precision.report import PrecisionReport
from .spec import NUMPY_TO_TORCH, TORCH_TO_NUMPY, ModuleSpec, conversion_hint, unflatten_outputs

# The specs moved to trtopt.spec; they stay importable from here, where code written for
# earlier versions imports them (docs/calibration.md's example did).
from .spec import TensorSpec, tensor_specs  # noqa: F401

logger = logging.getLogger(__name__)

FILE_FORMAT = "trtopt-module"
# Version 2 adds the ONNX external-data member (a model whose weights are on disk); a file
# without one is still written as version 1, which every trtopt reads.
FILE_VERSION = 1
FILE_VERSION_EXTERNAL_DATA = 2
READABLE_VERSIONS = (FILE_VERSION, FILE_VERSION_EXTERNAL_DATA)
MANIFEST = "manifest.json"
ONNX_MEMBER = "model.onnx"
ONNX_DATA_MEMBER = "model.onnx.data"
ENGINE_MEMBER = "engine.plan"
STREAM_CHUNK_BYTES = 1 << 24  # bytes per read or write when members are streamed

_SHAPE_CACHE_SIZE = 256


def _numpy_dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 has no numpy dtype: such inputs always take the full path
        return None


def _describe_ranges(profiles: Sequence[ShapeProfile], name: str) -> str:
    return "; ".join(f"profile {i}: {name} {p[name].describe()}" for i, p in enumerate(profiles))


def select_profile(profiles: Sequence[ShapeProfile], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Index of the first profile containing every input shape, else a ShapeError.

    The error names the input, the dimension, the value and each profile's range
    for it, so the user sees exactly which range to widen.
    """
    for index, profile in enumerate(profiles):
        if profile.contains(shapes):
            return index
    # Report the first offending (input, dim) of profile 0, with every profile's range.
    for name, shape in shapes.items():
        for d, value in enumerate(shape):
            if any(p[name].min[d] <= value <= p[name].max[d] for p in profiles):
                continue
            spans = ", ".join(
                f"profile {i}: {p[name].min[d]}..{p[name].max[d]}" for i, p in enumerate(profiles)
            )
            static = all(p[name].min[d] == p[name].max[d] for p in profiles)
            fix = (
                "this dimension is static in the compiled model"
                if static
                else "recompile with a wider range in dynamic_shapes"
            )
            raise ShapeError(
                f"input {name!r} dimension {d} is {value}, outside the compiled range ({spans}); {fix}"
            )
    raise ShapeError(
        "the input shapes "
        + ", ".join(f"{n}={tuple(s)}" for n, s in shapes.items())
        + " are each within some profile but no single profile holds all of them: "
        + " | ".join(_describe_ranges(profiles, n) for n in shapes)
    )


class CompiledModule:
    """A compiled model: call it like the torch model (torch in, torch out; numpy in, numpy out)."""

    def __init__(
        self,
        onnx_model: onnx.ModelProto,
        spec: ModuleSpec,
        backend: Runner,
        engine: bytes | None = None,
    ) -> None:
        self.onnx_model = onnx_model
        hold_weights_dir(self, onnx_model)  # weights on disk stay while the module lives
        self.spec = spec
        self.backend = backend
        self.engine = engine  # serialized TensorRT engine, when built
        self._inputs = {t.name: t for t in spec.inputs}
        self._names = tuple(t.name for t in spec.inputs)
        # The fast path (see _fast_call): what each input must be, and the shapes already checked.
        self._numpy_dtypes = tuple(_numpy_dtype(t.dtype) for t in spec.inputs)
        self._torch_dtypes = tuple(NUMPY_TO_TORCH.get(t.dtype) for t in spec.inputs)
        self._checked_shapes: dict[tuple[tuple[int, ...], ...], int] = {}
        self._single_tensor = spec.output_structure.get("type") == "tensor"
        # torch cannot share a bfloat16 tensor with numpy: a model with BF16 inputs or outputs always
        # takes the full path, where the backend converts them
        self._fast = all(t.dtype != "bfloat16" for t in (*spec.inputs, *spec.outputs))

    # ------------------------------------------------------------ properties
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.spec.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.spec.outputs]

    @property
    def profiles(self) -> tuple[ShapeProfile, ...]:
        return self.spec.profiles

    @property
    def precision(self) -> str:
        return self.spec.precision

    @property
    def precision_report(self) -> PrecisionReport:
        """What the precision pass did: Q/DQ count, nodes kept FP32 and why, layers not quantized.

        Read from the JSON the module file keeps (``spec.info["precision"]``), which stays as written.
        """
        return PrecisionReport.from_json(self.spec.info.get("precision") or {})

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __repr__(self) -> str:
        ins = ", ".join(f"{t.name}: {t.dtype}{list(t.shape)}" for t in self.spec.inputs)
        return (
            f"CompiledModule({ins}) -> {self.output_names} "
            f"[{self.precision}, {self.backend_name}, {len(self.profiles)} profile(s)]"
        )

    # ------------------------------------------------------------------ call
    def _collect(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        names = self.input_names
        if len(args) > len(names):
            raise InputError(
                f"got {len(args)} positional inputs but the module takes {len(names)}: ({', '.join(names)})"
            )
        values = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in self._inputs:
                raise InputError(f"unknown input {key!r}; the module takes ({', '.join(names)})")
            if key in values:
                raise InputError(f"input {key!r} given both by position and by keyword")
            values[key] = value
        missing = [n for n in names if n not in values]
        if missing:
            raise InputError(
                f"missing input(s) {', '.join(map(repr, missing))}; the module takes ({', '.join(names)})"
            )
        return values

    def _as_tensor(self, name: str, value: Any) -> torch.Tensor:
        spec = self._inputs[name]
        if isinstance(value, np.ndarray):
            dtype = value.dtype.name
            tensor = torch.from_numpy(np.ascontiguousarray(value)) if dtype in NUMPY_TO_TORCH else None
        elif isinstance(value, torch.Tensor):
            dtype = TORCH_TO_NUMPY.get(value.dtype, str(value.dtype))
            tensor = value
        else:
            raise InputError(
                f"input {name!r} is a {type(value).__name__}; pass a torch.Tensor or a numpy array"
            )
        if dtype != spec.dtype or tensor is None:
            raise InputError(
                f"input {name!r} has dtype {dtype} but the model expects {spec.dtype}; "
                f"convert it ({conversion_hint(spec.dtype)})"
            )
        if tensor.dim() != len(spec.shape):
            raise ShapeError(
                f"input {name!r} has rank {tensor.dim()} (shape {tuple(tensor.shape)}) but the model "
                f"expects rank {len(spec.shape)} ({_describe_ranges(self.profiles, name)})"
            )
        return tensor

    def _fast_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The common call, checked in a few microseconds, or None to take the full path.

        Every input by position, all numpy arrays or all CPU torch tensors, C-contiguous,
        of the model's dtype, with shapes the full path has already accepted (a profile is
        chosen once per shape combination). Those arrays go to the backend as they are, no
        copy. Anything else returns None and the full path checks it, with its errors.
        """
        run_numpy = getattr(self.backend, "run_numpy", None)
        if run_numpy is None or not self._fast or kwargs or len(args) != len(self._names):
            return None
        first = args[0]
        if type(first) is np.ndarray:
            for value, dtype in zip(args, self._numpy_dtypes):
                if type(value) is not np.ndarray or value.dtype != dtype or not value.flags.c_contiguous:
                    return None
            arrays = args
        elif type(first) is torch.Tensor:
            for value, torch_dtype in zip(args, self._torch_dtypes):
                if (
                    type(value) is not torch.Tensor
                    or value.dtype != torch_dtype
                    or not value.is_cpu
                    or value.requires_grad
                    or not value.is_contiguous()
                ):
                    return None
            arrays = tuple(value.numpy() for value in args)  # shares the tensor's memory
        else:
            return None
        if tuple(a.shape for a in arrays) not in self._checked_shapes:
            return None
        outputs = run_numpy(dict(zip(self._names, arrays)))
        if type(first) is torch.Tensor:
            outputs = [torch.from_numpy(o) for o in outputs]
        if self._single_tensor:
            return outputs[0]
        return unflatten_outputs(self.spec.output_structure, outputs)

    def _remember_shapes(self, shapes: tuple[tuple[int, ...], ...], index: int) -> None:
        if len(self._checked_shapes) >= _SHAPE_CACHE_SIZE:
            self._checked_shapes.clear()  # many distinct shapes: start over rather than grow
        self._checked_shapes[shapes] = index

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fast = self._fast_call(args, kwargs)
        if fast is not None:
            return fast
        values = self._collect(args, kwargs)
        feeds = {name: self._as_tensor(name, v) for name, v in values.items()}
        index = select_profile(self.profiles, {n: tuple(t.shape) for n, t in feeds.items()})
        if not kwargs and len(args) == len(self._names):
            self._remember_shapes(tuple(tuple(feeds[n].shape) for n in self._names), index)
        outputs = self.backend.run(feeds, index)
        if all(isinstance(v, np.ndarray) for v in values.values()):
            leaves: list[Any] = [o.cpu().numpy() for o in outputs]
        else:
            device = next(t.device for t in feeds.values())
            leaves = [o.to(device) for o in outputs]
        return unflatten_outputs(self.spec.output_structure, leaves)

    # ------------------------------------------------------------- save/load
    def export_onnx(self, path: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the final graph, a manifest, the target's build commands and (INT8) the
        calibration cache, so the engine can be built on another machine."""
        from .artifacts import export_onnx  # here, not at the top: artifacts imports this module

        return export_onnx(self, path)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write graph, engine (if any) and metadata to one file, atomically.

        Members are streamed into the file and their checksums computed on the way, so
        weights on disk (a model over ``trtopt.graph.EXTERNAL_DATA_THRESHOLD``) are copied
        in chunks and never held in memory.
        """
        path = Path(path)
        check_save_target(path)
        try:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as handle:
                    with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                        digests = self._write_members(archive)
                        manifest = {
                            "format": FILE_FORMAT,
                            "format_version": (
                                FILE_VERSION_EXTERNAL_DATA if ONNX_DATA_MEMBER in digests else FILE_VERSION
                            ),
                            "trtopt_version": __version__,
                            "spec": self.spec.to_json(),
                            "sha256": digests,
                        }
                        archive.writestr(MANIFEST, json.dumps(manifest, indent=1).encode())
                    handle.flush()
                    os.fsync(handle.fileno())
        except OSError as exc:
            raise ModuleFileError(
                f"cannot write the module file {path}: {exc.strerror or exc}; choose a path in a "
                "writable directory with free space"
            ) from exc
        return path

    def _write_members(self, archive: zipfile.ZipFile) -> dict[str, str]:
        """Stream the graph (and its external data) and the engine into ``archive``; their SHA-256."""
        digests = {}
        proto = self.onnx_model
        if weights_dir(proto) is not None:
            with archive.open(ONNX_DATA_MEMBER, "w", force_zip64=True) as member:
                writer = _HashingWriter(member)
                proto = write_external_copy(proto, writer, ONNX_DATA_MEMBER)
            digests[ONNX_DATA_MEMBER] = writer.hexdigest()
        with archive.open(ONNX_MEMBER, "w", force_zip64=True) as member:
            writer = _HashingWriter(member)
            for part in serialized_parts(proto):  # one tensor at a time (see serialized_parts)
                writer.write(part)
        digests[ONNX_MEMBER] = writer.hexdigest()
        if self.engine is not None:
            digests[ENGINE_MEMBER] = _write_member(archive, ENGINE_MEMBER, self.engine)
        return digests

    # ---------------------------------------------------------------- triton
    def export_triton(
        self,
        repo_dir: str | os.PathLike[str],
        name: str,
        *,
        version: int = 1,
        max_batch_size: int | None = None,
        dynamic_batching: bool = True,
        max_queue_delay_us: int | None = None,
        instances: int = 1,
        overwrite: bool = False,
        flavour: str = "native",
    ) -> Path:
        """Write this module into a Triton model repository; see ``trtopt.triton.export_triton``."""
        from .triton import export_triton  # here, not at the top: triton imports this module

        return export_triton(
            self,
            repo_dir,
            name,
            version=version,
            max_batch_size=max_batch_size,
            dynamic_batching=dynamic_batching,
            max_queue_delay_us=max_queue_delay_us,
            instances=instances,
            overwrite=overwrite,
            flavour=flavour,
        )


def _release(version: str) -> tuple[int, ...]:
    """``"0.10.2rc1"`` -> ``(0, 10, 2)``: the numeric release, enough to order trtopt's versions."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(n) for n in match.group(0).split(".")) if match else ()


def warn_if_newer(path: Path, written_by: Any) -> None:
    """Warn when a newer trtopt wrote the file: same file format, but it may record what this one ignores."""
    if isinstance(written_by, str) and _release(written_by) > _release(__version__):
        logger.warning(
            "%s was written by trtopt %s, newer than this trtopt (%s); it loads, but settings or precision "
            "details that version added are ignored here. Upgrade trtopt (pip install -U trtopt) to use them",
            path, written_by, __version__,
        )


class _HashingWriter:
    """A binary writer that hashes what goes through it and knows its position (zip members do not)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.position = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha256.update(data)
        self.target.write(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


def _write_member(archive: zipfile.ZipFile, name: str, data: bytes | bytearray | memoryview) -> str:
    """Write ``data`` as the member ``name`` in chunks; its SHA-256."""
    view = memoryview(data)
    with archive.open(name, "w", force_zip64=len(view) > (1 << 31)) as member:
        writer = _HashingWriter(member)
        for start in range(0, len(view), STREAM_CHUNK_BYTES):
            writer.write(view[start : start + STREAM_CHUNK_BYTES])
    return writer.hexdigest()


def _read_member(archive: zipfile.ZipFile, name: str, target: Any | None = None) -> tuple[bytes | None, str]:
    """Read the member ``name`` in chunks, hashing it: into ``target`` (a binary file) when given,
    else into memory. Returns (the bytes or None, the SHA-256)."""
    sha256 = hashlib.sha256()
    buffer = io.BytesIO()
    sink = buffer if target is None else target
    with archive.open(name) as member:
        for block in iter(lambda: member.read(STREAM_CHUNK_BYTES), b""):
            sha256.update(block)
            sink.write(block)
    return (buffer.getvalue() if target is None else None), sha256.hexdigest()


def check_save_target(path: Path) -> None:
    """A ModuleFileError, naming ``path`` and the fix, where a module file cannot be written."""
    if path.is_dir():
        raise ModuleFileError(
            f"cannot save the module to {path}: it is a directory; pass a file path such as "
            f"{path / 'model.trtopt'}"
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ModuleFileError(
                    f"cannot save the module to {path}: {parent} is a file, not a directory; "
                    "choose a path whose parent directories are directories (missing ones are created)"
                )
            break


def check_module_path(path: Path) -> None:
    """A ModuleFileError, naming ``path`` and the fix, where there is no module file to read."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.trtopt"))
        hint = f" (it holds {', '.join(found[:5])})" if found else ""
        raise ModuleFileError(
            f"{path} is a directory, not a module file{hint}; pass the path of the file "
            "CompiledModule.save wrote, e.g. trtopt.load('model.trtopt')"
        )
    if not path.exists():
        raise ModuleFileError(
            f"{path} does not exist; check the path, or write the file first with CompiledModule.save"
        )
    if not os.access(path, os.R_OK):
        raise ModuleFileError(f"{path} cannot be read (permission denied); make it readable for this user")


def read_module_file(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, ModuleSpec, bytes | None]:
    """Read and verify a file written by ``CompiledModule.save``.

    Each member is checked against its SHA-256 while it streams. External weights
    (version 2) go straight to a new temporary weights directory, never into memory;
    the returned graph points there (``trtopt.graph.weights_dir``), and whoever keeps the
    graph holds the directory (``hold_weights_dir``; ``CompiledModule`` does).
    """
    path = Path(path)
    check_module_path(path)
    directory: Path | None = None
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if MANIFEST not in names:
                raise ModuleFileError(
                    f"{path} is not a trtopt module file (no {MANIFEST}); create one with CompiledModule.save"
                )
            manifest = json.loads(archive.read(MANIFEST))
            if manifest.get("format") != FILE_FORMAT:
                raise ModuleFileError(f"{path} is not a trtopt module file (format {manifest.get('format')!r})")
            if manifest.get("format_version") not in READABLE_VERSIONS:
                raise ModuleFileError(
                    f"{path} has file format version {manifest.get('format_version')}, this trtopt "
                    f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}; recompile the model"
                )
            warn_if_newer(path, manifest.get("trtopt_version"))
            members: dict[str, bytes | None] = {}
            for name, digest in manifest["sha256"].items():
                if name not in names:
                    raise ModuleFileError(f"{path} is incomplete: {name} is missing")
                if name == ONNX_DATA_MEMBER:
                    directory = new_weights_dir()
                    with open(directory / ONNX_DATA_MEMBER, "wb") as target:
                        data, actual = _read_member(archive, name, target)
                else:
                    data, actual = _read_member(archive, name)
                if actual != digest:
                    raise ModuleFileError(f"{path} is corrupt: {name} does not match its checksum")
                members[name] = data
    except (zipfile.BadZipFile, EOFError, OSError, json.JSONDecodeError, KeyError) as exc:
        discard_weights_dir(directory)
        raise ModuleFileError(
            f"{path} is truncated, corrupt or not a trtopt module file ({type(exc).__name__}: {exc})"
        ) from exc
    except BaseException:
        discard_weights_dir(directory)
        raise
    onnx_bytes = members.get(ONNX_MEMBER)
    if onnx_bytes is None:
        discard_weights_dir(directory)
        raise ModuleFileError(
            f"{path} is incomplete or not a trtopt module file: its manifest lists no {ONNX_MEMBER}; recompile the model"
        )
    model = onnx.load_from_string(onnx_bytes)
    if directory is not None:
        set_weights_dir(model, directory)
    return model, ModuleSpec.from_json(manifest["spec"]), members.get(ENGINE_MEMBER)


