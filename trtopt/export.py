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
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import torch

from . import graph
from .config import ShapeProfile
from .errors import ConfigError, ExportError, InputError, first_line
from .spec import flatten_outputs

logger = logging.getLogger(__name__)

# -------------------------------------------------------------------- names


def forward_input_names(model: Any, count: int) -> list[str]:
    """Name the first ``count`` positional inputs after the forward signature."""
    if isinstance(model, torch.export.ExportedProgram):
        names = list(model.graph_signature.user_inputs)[:count]
        return names + [f"input_{i}" for i in range(len(names), count)]
    if isinstance(model, torch.jit.ScriptModule):
        # TorchScript keeps the signature in the schema; the first argument is self.
        names = [a.name for a in model.forward.schema.arguments[1:]][:count]
        return names + [f"input_{i}" for i in range(len(names), count)]
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names: list[str] = []
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
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    names: list[str],
    output_names: list[str],
    profiles: Sequence[ShapeProfile],
    opset: int,
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
    # The exporter prints progress to stdout; keep it in the debug log instead.
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
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
    logger.debug("torch.onnx (dynamo) said:\n%s", buffer.getvalue())
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
) -> onnx.ModelProto:
    dynamic_axes = {
        name: {d: f"{name}_dim{d}" for d in profiles[0][name].dynamic} for name in names
    }
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            args,
            buffer,
            input_names=names,
            output_names=output_names,
            dynamic_axes={k: v for k, v in dynamic_axes.items() if v},
            opset_version=opset,
            dynamo=False,
        )
    traced = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if traced:
        raise ExportError(
            "the TorchScript exporter had to fix a data-dependent value of the example inputs "
            f"into the graph ({traced[0].message}); that graph would be wrong for other inputs. "
            "Make forward() free of Python control flow on tensor values (use torch.where / "
            "torch.cond), or export the model yourself and compile the ONNX file"
        )
    return onnx.load_from_string(buffer.getvalue())


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
    is_script = isinstance(model, torch.jit.ScriptModule)
    runnable = model.module() if is_program else model
    was_training = runnable.training
    if not is_program:  # an ExportedProgram's module() cannot switch modes; it was exported as it is
        runnable.eval()
    try:
        args = tuple(export_examples(names, list(example_inputs), profiles))
        with torch.no_grad():
            outputs = runnable(*args)
        _, structure, output_names = flatten_outputs(outputs)
        output_names = _unique(output_names)
        if is_script:
            onnx_model = _torchscript_export(model, args, names, output_names, profiles, opset)
            exporter = "torchscript"
        else:
            try:
                onnx_model = _dynamo_export(model, args, names, output_names, profiles, opset)
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
                        f"the ExportedProgram could not be converted to ONNX: {first_line(dynamo_error)}. "
                        "Pass the nn.Module instead, so the TorchScript exporter can be tried"
                    ) from dynamo_error
                logger.warning(
                    "torch.export-based ONNX export failed (%s: %s); trying the TorchScript exporter",
                    type(dynamo_error).__name__,
                    first_line(dynamo_error),
                )
                try:
                    onnx_model = _torchscript_export(model, args, names, output_names, profiles, opset)
                    exporter = "torchscript"
                except ExportError:
                    raise
                except Exception as ts_error:
                    raise ExportError(
                        f"{type(model).__name__} could not be exported to ONNX. torch.export-based "
                        f"exporter: {type(dynamo_error).__name__}: {first_line(dynamo_error)} | "
                        f"TorchScript exporter: {type(ts_error).__name__}: {first_line(ts_error)}. "
                        "Replace the unsupported operation, or export to ONNX yourself and compile the file"
                    ) from ts_error
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
