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
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch

from ._version import __version__
from .backends.runner import Runner
from .config import ShapeProfile
from .errors import InputError, ModuleFileError, ShapeError
from .files import atomic_write
from .spec import NUMPY_TO_TORCH, TORCH_TO_NUMPY, ModuleSpec, conversion_hint, unflatten_outputs

# The specs moved to trtopt.spec; they stay importable from here, where code written for
# earlier versions imports them (docs/calibration.md's example did).
from .spec import TensorSpec, tensor_specs  # noqa: F401

if TYPE_CHECKING:
    from .precision.report import PrecisionReport

logger = logging.getLogger(__name__)

FILE_FORMAT = "trtopt-module"
FILE_VERSION = 1
MANIFEST = "manifest.json"
ONNX_MEMBER = "model.onnx"
ENGINE_MEMBER = "engine.plan"

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
        from .precision.report import PrecisionReport  # the precision package imports this module

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
            for value, dtype in zip(args, self._torch_dtypes):
                if (
                    type(value) is not torch.Tensor
                    or value.dtype != dtype
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
        from .artifacts import export_onnx

        return export_onnx(self, path)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write graph, engine (if any) and metadata to one file, atomically."""
        path = Path(path)
        members = {ONNX_MEMBER: self.onnx_model.SerializeToString()}
        if self.engine is not None:
            members[ENGINE_MEMBER] = bytes(self.engine)
        manifest = {
            "format": FILE_FORMAT,
            "format_version": FILE_VERSION,
            "trtopt_version": __version__,
            "spec": self.spec.to_json(),
            "sha256": {k: hashlib.sha256(v).hexdigest() for k, v in members.items()},
        }
        members[MANIFEST] = json.dumps(manifest, indent=1).encode()
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        return atomic_write(path, buffer.getvalue())

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
        from .triton import export_triton

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


def read_module_file(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, ModuleSpec, bytes | None]:
    """Read and verify a file written by ``CompiledModule.save``."""
    path = Path(path)
    if not path.is_file():
        raise ModuleFileError(f"{path} does not exist")
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
            if manifest.get("format_version") != FILE_VERSION:
                raise ModuleFileError(
                    f"{path} has file format version {manifest.get('format_version')}, this trtopt "
                    f"({__version__}) reads version {FILE_VERSION}; recompile the model"
                )
            warn_if_newer(path, manifest.get("trtopt_version"))
            members = {}
            for name, digest in manifest["sha256"].items():
                if name not in names:
                    raise ModuleFileError(f"{path} is incomplete: {name} is missing")
                data = archive.read(name)
                if hashlib.sha256(data).hexdigest() != digest:
                    raise ModuleFileError(f"{path} is corrupt: {name} does not match its checksum")
                members[name] = data
    except (zipfile.BadZipFile, EOFError, OSError, json.JSONDecodeError, KeyError) as exc:
        raise ModuleFileError(
            f"{path} is truncated, corrupt or not a trtopt module file ({type(exc).__name__}: {exc})"
        ) from exc
    model = onnx.load_from_string(members[ONNX_MEMBER])
    return model, ModuleSpec.from_json(manifest["spec"]), members.get(ENGINE_MEMBER)
