"""Export a compiled module as a Triton Inference Server model repository.

Triton serves a directory ``<repo>/<name>/`` holding ``config.pbtxt`` and one
numbered directory per version with the model file. Two flavours:

- ``native``: ``model.plan`` for a TensorRT engine (``tensorrt_plan``) or
  ``model.onnx`` for ONNX Runtime (``onnxruntime_onnx``), for full Triton
  containers, which run the model without Python;
- ``python``: Triton's Python backend runs ``model.py``, which loads
  ``model.trtopt`` and runs it with trtopt (``trtopt.triton_python``). It runs
  on any Triton whose Python environment has trtopt, including the one
  bundled in PyTriton that ``trtopt serve`` starts (``trtopt.serve``).

The config is built as the real ``inference.ModelConfig`` protobuf message
from ``tritonclient`` and printed with protobuf's text format, so it always
parses with Triton's schema. Both flavours and ``trtopt serve`` derive it with
the one ``build_config`` below.

Triton batches along the first dimension of every input and output, and may
form any batch size from 1 to ``max_batch_size``. Everything below checks that
the module's optimization profiles can take every such batch, and raises a
ConfigError naming the fix when they cannot, so the repository does not fail
only when Triton loads it or, worse, on some batch sizes at run time.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from google.protobuf import text_format

from .errors import ConfigError, DependencyError
from .files import atomic_write
from .spec import TRITON_DTYPES
from .graph import save_model

if TYPE_CHECKING:
    from .module import CompiledModule
    from .spec import TensorSpec

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
PLAN_FILE = "model.plan"  # Triton's default file name for platform tensorrt_plan
ONNX_FILE = "model.onnx"  # ... and for platform onnxruntime_onnx
PYTHON_FILE = "model.py"  # the Python backend's entry point ...
MODULE_FILE = "model.trtopt"  # ... and the module file it loads
FLAVOURS = ("native", "python")
# The whole model.py of the python flavour: the model class lives in trtopt, where it is tested.
PYTHON_MODEL_SOURCE = (
    '"""Triton Python-backend model written by trtopt: runs model.trtopt with trtopt."""\n'
    "from trtopt.triton_python import TritonPythonModel  # noqa: F401\n"
)
TRITON_INSTALL_HINT = 'install it with `pip install "trtopt[triton]"` (tritonclient[grpc])'

BatchRange = tuple[int, int, int]  # (min, opt, max) of the batch dimension in one profile


def _model_config_pb2() -> ModuleType:
    """Triton's model-config schema; imported lazily because tritonclient is an extra."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise DependencyError(
            "exporting a Triton model repository needs Triton's model-config schema from "
            f"tritonclient, which is not installed ({exc}); {TRITON_INSTALL_HINT}"
        ) from exc
    return model_config_pb2


# ------------------------------------------------------------------ checks


def _check_arguments(
    name: str, version: int, max_batch_size: int | None, instances: int, flavour: str, max_queue_delay_us: int | None
) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(
            f"Triton model name {name!r} is not a single directory name; use a name without "
            "slashes such as 'resnet50' (the repository path goes in repo_dir)"
        )
    if not _is_int(version) or version < 1:
        raise ConfigError(
            f"version={version!r}: Triton model versions are directory names 1, 2, 3, ...; "
            "pass an integer >= 1"
        )
    if max_batch_size is not None and (not _is_int(max_batch_size) or max_batch_size < 0):
        raise ConfigError(
            f"max_batch_size={max_batch_size!r} must be None (derive it from the optimization "
            "profiles), 0 (no batching by Triton) or a positive integer"
        )
    if not _is_int(instances) or instances < 1:
        raise ConfigError(
            f"instances={instances!r} must be a positive integer (model instances per device)"
        )
    if flavour not in FLAVOURS:
        raise ConfigError(
            f"flavour={flavour!r}: use 'native' (model.plan / model.onnx, for full Triton containers) "
            "or 'python' (Triton's Python backend runs the .trtopt file with trtopt)"
        )
    if max_queue_delay_us is not None and (not _is_int(max_queue_delay_us) or max_queue_delay_us < 0):
        raise ConfigError(
            f"max_queue_delay_us={max_queue_delay_us!r} must be None (Triton's default) or an integer >= 0 "
            "(microseconds a request may wait for others to batch with)"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_dynamic(dim: int | str) -> bool:
    return isinstance(dim, str)  # TensorSpec: an int is fixed, a str names a dynamic dim


def _describe(ranges: Sequence[BatchRange]) -> str:
    return ", ".join(f"profile {i}: {lo}..{hi}" for i, (lo, _, hi) in enumerate(ranges))


def _batch_ranges(module: CompiledModule, requested: int | None) -> list[BatchRange] | None:
    """Each profile's batch range, or None when the model cannot be batched by Triton.

    Triton batches every input along dim 0, so a batchable model has a dynamic
    first dim on every input, with one range per profile shared by all inputs,
    and every output grows with it. With ``requested=None`` a model whose
    inputs do not all have a dynamic first dim is simply served unbatched
    (max_batch_size 0); asking for batching then is an error.
    """
    inputs = module.spec.inputs
    batched = [t for t in inputs if t.shape and _is_dynamic(t.shape[0])]
    if len(batched) < len(inputs):
        if requested is None:
            logger.info(
                "Triton export: not every input has a dynamic first dimension, so max_batch_size "
                "is 0 (clients send full shapes, Triton does not batch requests)"
            )
            return None
        fixed = next(t for t in inputs if not (t.shape and _is_dynamic(t.shape[0])))
        other = next((d for d, dim in enumerate(fixed.shape) if _is_dynamic(dim)), None)
        if other is not None:
            raise ConfigError(
                f"max_batch_size={requested}: Triton batches along the first dimension, but input "
                f"{fixed.name!r} (shape {list(fixed.shape)}) has a fixed first dimension and a "
                f"dynamic dimension {other}; make the batch the first dimension (e.g. permute in a "
                "wrapper module) and compile with dynamic_shapes="
                f"{{{fixed.name!r}: {{0: (1, 8, 32)}}}}, or pass max_batch_size=0 to serve full shapes"
            )
        shape = "a scalar" if not fixed.shape else f"a fixed first dimension ({fixed.shape[0]})"
        raise ConfigError(
            f"max_batch_size={requested}: input {fixed.name!r} has {shape}, so Triton cannot batch "
            f"it; compile with a dynamic batch, e.g. dynamic_shapes={{{fixed.name!r}: "
            "{0: (1, 8, 32)}} for every input, or pass max_batch_size=0 to serve full shapes"
        )

    ranges = []
    for index, profile in enumerate(module.profiles):
        spans = {}
        for t in inputs:
            r = profile[t.name]
            spans[t.name] = (r.min[0], r.opt[0], r.max[0])
        if len(set(spans.values())) > 1:
            listed = ", ".join(f"{n}: {lo}..{hi} (opt {opt})" for n, (lo, opt, hi) in spans.items())
            raise ConfigError(
                f"profile {index}: the inputs disagree on the batch range ({listed}), but Triton "
                "sends every input the same batch size; give dimension 0 of every input the same "
                "(min, opt, max) in dynamic_shapes, or pass max_batch_size=0 to serve full shapes"
            )
        ranges.append(next(iter(spans.values())))

    batch_symbols = {t.shape[0] for t in inputs}
    for out in module.spec.outputs:
        if not out.shape or not _is_dynamic(out.shape[0]):
            raise ConfigError(
                f"output {out.name!r} (shape {list(out.shape)}) does not have the batch as its first "
                "dimension, so Triton cannot split it between batched requests; pass "
                "max_batch_size=0 to serve full shapes"
            )
        if out.shape[0] not in batch_symbols:
            # A dynamic first dim we cannot prove is the batch (e.g. an exporter's own symbol).
            logger.warning(
                "Triton export: output %r has first dimension %r, not one of the inputs' batch "
                "dimensions %s; Triton will split it along dim 0 as if it were the batch",
                out.name,
                out.shape[0],
                sorted(batch_symbols),
            )
    return ranges


def _check_coverage(ranges: Sequence[BatchRange], max_batch_size: int) -> None:
    """Every batch size 1..max_batch_size must fall in some profile: Triton may form any of them."""
    largest = max(hi for _, _, hi in ranges)
    if max_batch_size > largest:
        raise ConfigError(
            f"max_batch_size={max_batch_size} is larger than the largest batch the optimization "
            f"profiles accept ({largest}; {_describe(ranges)}); pass max_batch_size<={largest} or "
            f"recompile with a larger batch range in dynamic_shapes"
        )
    covered = 0  # batch sizes 1..covered are in some profile
    for lo, _, hi in sorted(ranges):
        if lo > covered + 1:
            break
        covered = max(covered, hi)
    if covered < max_batch_size:
        gap_end = min([lo - 1 for lo, _, _ in ranges if lo > covered + 1] + [max_batch_size])
        raise ConfigError(
            f"Triton may form any batch from 1 to max_batch_size={max_batch_size}, but batch sizes "
            f"{covered + 1}..{gap_end} are in no optimization profile ({_describe(ranges)}); "
            f"recompile with profiles that cover 1..{max_batch_size} without gaps, or pass "
            + (f"max_batch_size<={covered}" if covered else "max_batch_size=0")
        )


def _resolve_batching(module: CompiledModule, max_batch_size: int | None) -> tuple[int, list[int]]:
    """``(max_batch_size, preferred batch sizes)`` for the config; raises ConfigError when unservable.

    ``None`` means: batch when every input's first dim is dynamic, up to the
    largest batch the profiles take. The preferred sizes are the profiles' opt
    batch sizes, the shapes TensorRT tuned its kernels for.
    """
    if max_batch_size == 0:
        return 0, []
    ranges = _batch_ranges(module, max_batch_size)
    if ranges is None:
        return 0, []
    if max_batch_size is None:
        max_batch_size = max(hi for _, _, hi in ranges)
    _check_coverage(ranges, max_batch_size)
    preferred = sorted({opt for _, opt, _ in ranges if opt <= max_batch_size})
    return max_batch_size, preferred


# ------------------------------------------------------------------ config


def _add_tensor(message: Any, pb2: ModuleType, spec: TensorSpec, max_batch_size: int, kind: str) -> None:
    dtype = TRITON_DTYPES.get(spec.dtype)
    if dtype is None:
        raise ConfigError(
            f"{kind} {spec.name!r} has dtype {spec.dtype}, which Triton has no type for; "
            f"use one of {', '.join(TRITON_DTYPES)}"
        )
    shape = spec.shape[1:] if max_batch_size > 0 else spec.shape
    tensor = message.add(name=spec.name, data_type=pb2.DataType.Value(dtype))
    if shape:
        tensor.dims.extend(-1 if _is_dynamic(d) else int(d) for d in shape)
    elif max_batch_size > 0:
        # Triton needs non-empty dims: a batch-only tensor is [1] reshaped to [] (per request).
        tensor.dims.append(1)
        tensor.reshape.SetInParent()
    else:
        raise ConfigError(
            f"{kind} {spec.name!r} is a scalar, which Triton cannot serve without batching; "
            "give it a dimension (e.g. shape [1]) in the model"
        )


def build_config(
    module: CompiledModule,
    name: str,
    *,
    max_batch_size: int | None = None,
    dynamic_batching: bool = True,
    max_queue_delay_us: int | None = None,
    instances: int = 1,
    flavour: str = "native",
) -> Any:
    """The ``inference.ModelConfig`` message for ``module`` (see ``export_triton``).

    The one derivation of a Triton config from a module: both flavours of
    ``export_triton`` and ``trtopt serve`` use it, so they agree on dims,
    dtypes, batching and errors.
    """
    pb2 = _model_config_pb2()
    is_plan = module.engine is not None
    batch, preferred = _resolve_batching(module, max_batch_size)
    if flavour == "python":
        config = pb2.ModelConfig(name=name, backend="python", max_batch_size=batch)
    else:
        config = pb2.ModelConfig(
            name=name,
            platform="tensorrt_plan" if is_plan else "onnxruntime_onnx",
            max_batch_size=batch,
        )
    for spec in module.spec.inputs:
        _add_tensor(config.input, pb2, spec, batch, "input")
    for spec in module.spec.outputs:
        _add_tensor(config.output, pb2, spec, batch, "output")
    if dynamic_batching and batch > 0:
        config.dynamic_batching.preferred_batch_size.extend(preferred)
        if max_queue_delay_us is not None:
            config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    elif dynamic_batching:
        logger.info("Triton export: no dynamic_batching, as the model is not batched (max_batch_size 0)")
    group = config.instance_group.add(
        count=instances,
        kind=pb2.ModelInstanceGroup.KIND_GPU if is_plan else pb2.ModelInstanceGroup.KIND_CPU,
    )
    if is_plan and flavour == "native" and len(module.profiles) > 1:
        # Without it Triton's TensorRT backend uses profile 0 only; listed, it picks per request shape.
        group.profile.extend(str(i) for i in range(len(module.profiles)))
    if not is_plan and flavour == "native" and module.precision == "fp8":
        # ONNX Runtime's extended rewrites drop a Relu in front of an FP8 QuantizeLinear (FP8 is
        # signed; see trtopt/executor/session.py). Triton's ONNX Runtime backend has no way to
        # disable one rewrite: level -1 keeps only the basic ones, which compute the graph faithfully.
        config.optimization.graph.level = -1
    if not is_plan and module.precision == "nvfp4":
        raise ConfigError(
            "an NVFP4 module without a TensorRT engine cannot be served: ONNX Runtime has no FP4 "
            "kernel (trtopt decodes the weights itself to emulate them); compile it with backend='tensorrt' "
            "on a Blackwell GPU (compute capability 10.0+), or use precision='int4'"
        )
    return config


# ------------------------------------------------------------------ files


def _write_version(module: CompiledModule, model_dir: Path, version_dir: Path, flavour: str) -> None:
    """Fill a hidden staging directory, then rename it to ``version_dir`` in one step."""
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{version_dir.name}.", suffix=".tmp"))
    trash = None
    try:
        if flavour == "python":
            module.save(staging / MODULE_FILE)
            atomic_write(staging / PYTHON_FILE, PYTHON_MODEL_SOURCE)
        elif module.engine is not None:
            with open(staging / PLAN_FILE, "wb") as handle:
                handle.write(bytes(module.engine))
                handle.flush()
                os.fsync(handle.fileno())
        else:
            save_model(module.onnx_model, staging / ONNX_FILE)
        for path in [staging, *staging.iterdir()]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if version_dir.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            trash = model_dir / f".{version_dir.name}.old-{uuid.uuid4().hex}"
            os.rename(version_dir, trash)
        os.rename(staging, version_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def export_triton(
    module: CompiledModule,
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
    """Write ``module`` into a Triton model repository; return the model directory ``<repo>/<name>``.

    The model file is the TensorRT engine (``model.plan``, ``tensorrt_plan``,
    instances on GPUs) when the module has one, otherwise the ONNX graph
    (``model.onnx``, ``onnxruntime_onnx``, instances on the CPU, as the module
    itself runs). ``max_batch_size=None`` derives batching from the
    optimization profiles (0 when the first dim is not dynamic); ``instances``
    is the instance count per device. An existing version is only replaced
    with ``overwrite=True``. Raises ConfigError for what Triton cannot serve.

    ``flavour="python"`` writes ``model.trtopt`` and a ``model.py`` for
    Triton's Python backend instead, which runs the module with trtopt (on
    the GPU when it holds an engine, else on the CPU); the serving Triton's
    Python environment needs trtopt installed. ``max_queue_delay_us`` sets how
    long the dynamic batcher may hold a request to batch it with others.
    """
    _check_arguments(name, version, max_batch_size, instances, flavour, max_queue_delay_us)
    config = build_config(
        module,
        name,
        max_batch_size=max_batch_size,
        dynamic_batching=dynamic_batching,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        flavour=flavour,
    )
    text = text_format.MessageToString(config)
    model_dir = Path(repo_dir) / name
    version_dir = model_dir / str(version)
    if version_dir.exists() and not overwrite:
        raise ConfigError(
            f"{version_dir} already exists; pass overwrite=True to replace it, or export as a "
            "new version (Triton serves the highest version by default)"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    config_path = model_dir / CONFIG_FILE
    others = [p.name for p in model_dir.iterdir() if p.name.isdigit() and p.name != str(version)]
    if others and config_path.exists() and config_path.read_text() != text:
        logger.warning(
            "Triton export: %s is shared by every version of %r (also %s) and changes now; "
            "check that the other versions still match it",
            config_path,
            name,
            ", ".join(sorted(others, key=int)),
        )
    _write_version(module, model_dir, version_dir, flavour)
    atomic_write(config_path, text)  # after the model file, so Triton never sees a config without one
    logger.info(
        "exported %s to %s (version %d, %s, max_batch_size %d)",
        name,
        model_dir,
        version,
        config.platform or f"{config.backend} backend",
        config.max_batch_size,
    )
    return model_dir
