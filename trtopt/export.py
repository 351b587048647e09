"""torch.nn.Module -> ONNX, with named dynamic dims and the model's output structure.

The torch.export-based exporter (``dynamo=True``) is used first; when it fails,
the TorchScript exporter is tried with a logged warning. A TorchScript trace
that had to bake a data-dependent value into the graph is refused, because that
graph would silently be wrong for other inputs.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import tempfile
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import torch

from . import graph
from .profiles import ShapeProfile
from .errors import ConfigError, ExportError, InputError, first_line
from .spec import flatten_outputs

logger = logging.getLogger(__name__)

# -------------------------------------------------------------------- names


def forward_input_names(model: Any, count: int) -> list[str]:
    """Name the first ``count`` positional inputs after the forward signature."""
    if isinstance(model, torch.export.ExportedProgram):
        names = list(model.graph_signature.user_inputs)[:count]
        return names + [f"input_{i}" for i in range(len(names), count)]
    if isinstance(model, torch.jit.ScriptModule) and isinstance(model.forward, torch.ScriptMethod):
        # TorchScript keeps the signature in the schema; the first argument is self.
        names = [a.name for a in model.forward.schema.arguments[1:]][:count]
        return names + [f"input_{i}" for i in range(len(names), count)]
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            break
    names = names[:count]
    names += [f"input_{i}" for i in range(len(names), count)]
    return names


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        seen.setdefault(n, 0)
        out.append(n)
    return out


# ------------------------------------------------------------------- export


def _shape_conflict(error: BaseException) -> str | None:
    """The exporter's message when the user's ranges contradict the model, else None.

    Falling back to the TorchScript exporter would hide this: it would mark the
    dim dynamic anyway and the graph would fail later, at run time.
    """
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if "user-specified" in text or "Constraints violated" in text:
            return text[text.find("Found"):].strip() if "Found" in text else text.strip()
        current = current.__cause__ or current.__context__
    return None


# Where the innermost exception's text names the user's code: torch.export writes
# "The following call raised this error:" or "Original traceback:" followed by frames.
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(\S[^\n]*)')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _innermost(error: BaseException) -> BaseException:
    """The exception at the bottom of ``error``'s chain (``__cause__``, else ``__context__``)."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or error.__context__
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def root_cause(error: BaseException) -> str:
    """``Type: first line`` of the exception that started ``error``, and the user's line it names.

    torch.export wraps the real error ("Could not guard on data-dependent expression",
    "Cannot view a tensor with shape ...") in a "This is step 1/3 ... Next steps"
    page whose first line says nothing about the model.
    """
    inner = _innermost(error)
    text = _ANSI.sub("", str(inner))
    line = f"{type(inner).__name__}: {first_line(inner)}" if text.strip() else type(inner).__name__
    frames = _FRAME.findall(text)
    if frames:
        path, number, function, code = frames[-1]  # the innermost frame of the printed stack
        line += f" (at {path}:{number} in {function}: {code.strip()})"
    return _ANSI.sub("", line)


def _is_data_dependent(error: BaseException) -> bool:
    inner = _innermost(error)
    return "DataDependent" in type(inner).__name__ or "data-dependent" in str(inner)


@contextlib.contextmanager
def _captured(log: io.StringIO) -> Iterator[None]:
    """Send what the exporters print (progress, torch's logging, pages of FX graph on failure)
    into ``log`` instead of the user's terminal; torch's log handlers write to ``sys.stderr``
    as it is at each call, so redirecting it catches them too."""
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


class _TorchlibRegistries:
    """torch.onnx.export's registry of torchlib functions, built once per opset instead of per export.

    The dynamo exporter rebuilds the registry on every call (``ONNXRegistry.from_torchlib``),
    parsing some 500 onnxscript functions (1.6-1.8 s per compile on a loaded 2-core machine).
    Its content depends only on the opset, so while trtopt exports, ``from_torchlib`` hands
    each export a copy of the one built first (its own lists: an export may register ops), and
    the exported graphs are the same. The original is restored when no trtopt export is running;
    a torch without this private API is left alone.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._original: Any = None
        self._built: dict[tuple[type, Any], Any] = {}

    @contextlib.contextmanager
    def reused(self) -> Iterator[None]:
        try:
            from torch.onnx._internal.exporter._registration import ONNXRegistry
        except ImportError:
            yield
            return
        with self._lock:
            if self._users == 0:
                self._original = ONNXRegistry.__dict__.get("from_torchlib")
                if isinstance(self._original, classmethod):
                    ONNXRegistry.from_torchlib = classmethod(self._cached(self._original.__func__))  # type: ignore[method-assign,assignment]
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and isinstance(self._original, classmethod):
                    ONNXRegistry.from_torchlib = self._original  # type: ignore[method-assign,assignment]

    def _cached(self, build: Any) -> Any:
        import copy

        def from_torchlib(cls: type, *args: Any, **kwargs: Any) -> Any:
            key = (cls, (args, tuple(sorted(kwargs.items()))))
            if key not in self._built:
                self._built[key] = build(cls, *args, **kwargs)
            built = self._built[key]
            registry = copy.copy(built)
            registry.functions = {target: list(entries) for target, entries in built.functions.items()}
            return registry

        return from_torchlib


_TORCHLIB = _TorchlibRegistries()


def _write_export_log(model_name: str, sections: Sequence[tuple[str, io.StringIO, BaseException]]) -> str | None:
    """Write each exporter's captured output and full traceback to a file; return its path.

    A failed export is where that output is worth reading, so it is kept in a file the
    ExportError names rather than printed (a detection model prints ~1,500 lines).
    """
    parts = []
    for title, log, error in sections:
        parts.append(f"===== {title}: output =====\n{log.getvalue()}")
        parts.append(f"===== {title}: traceback =====\n" + "".join(traceback.format_exception(error)))
    try:
        fd, path = tempfile.mkstemp(prefix=f"trtopt-export-{model_name}-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(parts))
    except OSError as exc:  # a full or read-only temp dir must not hide the export error itself
        logger.debug("could not write the export log: %s", exc)
        return None
    return path


class _TracerRefusal(ExportError):
    """The TorchScript exporter traced a data-dependent value into the graph."""


@dataclass(frozen=True)
class ExportedModel:
    model: onnx.ModelProto
    input_names: tuple[str, ...]  # forward-argument order
    output_names: tuple[str, ...]
    output_structure: dict[str, Any]
    exporter: str  # "dynamo" or "torchscript"


def check_example_inputs(names: Sequence[str], inputs: Sequence[Any]) -> None:
    for name, t in zip(names, inputs):
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"example input {name!r} is a {type(t).__name__}; example_inputs must be a tuple "
                "of torch tensors (positional forward arguments)"
            )


def resize_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Resize a dim by repeating slices (works for every dtype, keeps values realistic)."""
    if t.shape[dim] == size:
        return t
    index = torch.arange(size, device=t.device) % t.shape[dim]
    return t.index_select(dim, index)


def export_examples(
    names: Sequence[str], inputs: Sequence[torch.Tensor], profiles: Sequence[ShapeProfile]
) -> list[torch.Tensor]:
    """Example inputs for export, resized to the first profile's opt shape.

    torch.export specialises any dim whose example size is 0 or 1, so a batch of
    one would silently become a static batch; exporting at opt (at least 2 where
    the range allows) keeps every requested dim symbolic.
    """
    out = []
    for name, t in zip(names, inputs):
        r = profiles[0][name]
        for d in r.dynamic:
            lo = min(p[name].min[d] for p in profiles)
            hi = max(p[name].max[d] for p in profiles)
            size = r.opt[d] if r.opt[d] >= 2 else min(2, hi)
            if lo != hi:
                t = resize_dim(t, d, size)
        out.append(t)
    return out


def _rename_symbols(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Give exporter symbols like ``s31`` readable names such as ``x_dim0``."""
    mapping: dict[str, str] = {}
    for vi in model.graph.input:
        for d, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.dim_param and dim.dim_param not in mapping:
                mapping[dim.dim_param] = f"{vi.name}_dim{d}"
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in mapping) + r")\b")
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: mapping[m.group(0)], dim.dim_param)


def _dynamo_export(
    model: torch.nn.Module | torch.export.ExportedProgram,
    args: tuple[torch.Tensor, ...],
    names: list[str],
    output_names: list[str],
    profiles: Sequence[ShapeProfile],
    opset: int,
    log: io.StringIO,
) -> onnx.ModelProto:
    Dim = torch.export.Dim
    dynamic_shapes: dict[str, dict[int, Any]] = {}
    for name in names:
        dims = {}
        for d in profiles[0][name].dynamic:
            lo = min(p[name].min[d] for p in profiles)
            hi = max(p[name].max[d] for p in profiles)
            if lo != hi:
                dims[d] = Dim.DYNAMIC(min=lo, max=hi)
        dynamic_shapes[name] = dims
    # The exporter prints progress to stdout and, on failure, FX graphs to stderr: keep both in ``log``.
    with _captured(log), warnings.catch_warnings(), _TORCHLIB.reused():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            args,
            input_names=names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes if any(dynamic_shapes.values()) else None,
            opset_version=opset,
            dynamo=True,
            verbose=False,
            optimize=True,
        )
    if program is None:  # torch.onnx.export returns the program whenever dynamo=True
        raise ExportError("torch.onnx.export(dynamo=True) returned no ONNXProgram")
    if _weight_bytes(model) >= graph.EXTERNAL_DATA_THRESHOLD:
        return _weights_to_disk(program)
    return program.model_proto


def _weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (what the ONNX initializers will hold)."""
    state = model.state_dict  # an ExportedProgram's is a dict, an nn.Module's a method
    tensors = (state() if callable(state) else state).values()
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _weights_to_disk(program: Any) -> onnx.ModelProto:
    """The exported graph with its weights in a temporary weights directory (``trtopt.graph``).

    ``program.model_proto`` would hold a protobuf copy of every weight (and fails over 2 GB);
    saving writes them to the file tensor by tensor, and only the graph is read back.
    """
    directory = graph.new_weights_dir()
    path = directory / "exported.onnx"
    program.save(str(path), external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    path.unlink()
    graph.set_weights_dir(model, directory)
    return model


def _torchscript_export(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    names: list[str],
    output_names: list[str],
    profiles: Sequence[ShapeProfile],
    opset: int,
    log: io.StringIO,
) -> onnx.ModelProto:
    dynamic_axes = {
        name: {d: f"{name}_dim{d}" for d in profiles[0][name].dynamic} for name in names
    }
    buffer = io.BytesIO()
    with _captured(log), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            args,
            # torch annotates f as a path, but the TorchScript exporter (dynamo=False) writes to a file object too
            buffer,  # type: ignore[arg-type]
            input_names=names,
            output_names=output_names,
            dynamic_axes={k: v for k, v in dynamic_axes.items() if v},
            opset_version=opset,
            dynamo=False,
        )
    traced = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if traced:
        raise _TracerRefusal(
            "had to fix a data-dependent value of the example inputs "
            f"into the graph ({first_line(Exception(str(traced[0].message)))}); that graph would be wrong "
            "for other inputs"
        )
    return onnx.load_from_string(buffer.getvalue())


_DATA_DEPENDENT_FIX = (
    "Make forward() free of Python control flow on tensor values (use torch.where / torch.cond), "
    "or export the model to ONNX yourself and compile the file"
)


def _both_failed(
    model: Any, dynamo_error: Exception, dynamo_log: io.StringIO, ts_error: Exception, script_log: io.StringIO
) -> ExportError:
    """One ExportError with each exporter's root cause, said by which exporter, and the fix
    for the torch.export-based exporter's cause (the TorchScript one is only a fallback)."""
    name = type(model).__name__
    ts_cause = str(ts_error) if isinstance(ts_error, _TracerRefusal) else root_cause(ts_error)
    if _is_data_dependent(dynamo_error):
        fix = _DATA_DEPENDENT_FIX
    else:
        fix = (
            "Change the operation at the line the torch.export-based exporter names, "
            "or export the model to ONNX yourself and compile the file"
        )
    path = _write_export_log(name, [("torch.export-based exporter", dynamo_log, dynamo_error),
                                    ("TorchScript exporter", script_log, ts_error)])
    where = f" Both exporters' full output and tracebacks: {path}." if path else ""
    return ExportError(
        f"{name} could not be exported to ONNX. The torch.export-based exporter said: {root_cause(dynamo_error)}. "
        f"The TorchScript exporter (fallback) said: {ts_cause}. {fix}.{where}"
    )


def export(
    model: torch.nn.Module | torch.export.ExportedProgram,
    example_inputs: Sequence[Any],
    profiles: Sequence[ShapeProfile],
    opset: int,
    input_names: Sequence[str] | None = None,
) -> ExportedModel:
    """Export ``model`` to ONNX with one symbolic dim per range in ``profiles``.

    ``model`` is an ``nn.Module`` (torch.export-based exporter, TorchScript as a
    fallback), a TorchScript module (the TorchScript exporter, the only one that
    reads TorchScript) or a ``torch.export.ExportedProgram`` (its own dynamic
    dims; the profiles only give their ranges).
    """
    names = list(input_names or forward_input_names(model, len(example_inputs)))
    check_example_inputs(names, example_inputs)
    is_program = isinstance(model, torch.export.ExportedProgram)
    runnable = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    was_training = runnable.training
    if not is_program:  # an ExportedProgram's module() cannot switch modes; it was exported as it is
        runnable.eval()
    try:
        args = tuple(export_examples(names, list(example_inputs), profiles))
        with torch.no_grad():
            outputs = runnable(*args)
        _, structure, output_names = flatten_outputs(outputs)
        output_names = _unique(output_names)
        dynamo_log, script_log = io.StringIO(), io.StringIO()
        if isinstance(model, torch.jit.ScriptModule):
            try:
                onnx_model = _torchscript_export(model, args, names, output_names, profiles, opset, script_log)
            except _TracerRefusal as refusal:
                raise ExportError(f"the TorchScript exporter {refusal}. {_DATA_DEPENDENT_FIX}") from refusal
            exporter = "torchscript"
        else:
            failed: Exception | None = None
            try:
                onnx_model = _dynamo_export(model, args, names, output_names, profiles, opset, dynamo_log)
                exporter = "dynamo"
            except Exception as dynamo_error:  # the exporter raises many unrelated types
                conflict = _shape_conflict(dynamo_error)
                if conflict:
                    raise ConfigError(
                        f"dynamic_shapes does not fit the model: {conflict} Remove that dimension "
                        "from dynamic_shapes or give it the range the model allows"
                    ) from dynamo_error
                if is_program:
                    raise ExportError(
                        f"the ExportedProgram could not be converted to ONNX: {root_cause(dynamo_error)}. "
                        "Pass the nn.Module instead, so the TorchScript exporter can be tried"
                    ) from dynamo_error
                logger.warning(
                    "torch.export-based ONNX export failed (%s); trying the TorchScript exporter",
                    root_cause(dynamo_error),
                )
                failed = dynamo_error
            if failed is not None:
                # Outside the except block, so that the fallback's errors do not chain onto torch.export's
                # and each exporter's root cause stays its own. An ExportedProgram raised above, so
                # ``runnable`` is the nn.Module ``model`` itself.
                try:
                    onnx_model = _torchscript_export(runnable, args, names, output_names, profiles, opset, script_log)
                    exporter = "torchscript"
                except Exception as ts_error:
                    raise _both_failed(model, failed, dynamo_log, ts_error, script_log) from ts_error
        logger.debug("the exporter printed:\n%s%s", dynamo_log.getvalue(), script_log.getvalue())
    finally:
        if not is_program:
            runnable.train(was_training)
    _rename_symbols(onnx_model, names)
    logger.info(
        "exported %s to ONNX with the %s exporter (opset %d, %d nodes)",
        type(model).__name__,
        exporter,
        opset,
        len(onnx_model.graph.node),
    )
    return ExportedModel(onnx_model, tuple(names), tuple(output_names), structure, exporter)
