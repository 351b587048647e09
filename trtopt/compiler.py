"""``compile`` and ``load``: the pipeline export -> cleanup -> precision -> backend."""

from __future__ import annotations

import logging
import os
import time
from enum import Enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from . import _deps
from .config import (
    ENGINE_SETTINGS,
    Backend,
    BuildConfig,
    Precision,
    ShapeProfile,
    build_profiles,
    check_profiles_against_graph,
)
from .errors import CalibrationError, ConfigError, GraphError, InputError, first_line
from .export import check_example_inputs, export, forward_input_names
from .graph import cleanup, graph_input_shapes
from .names import assign_names, node_modules
from .module import CompiledModule, ModuleSpec, read_module_file, tensor_specs

logger = logging.getLogger(__name__)


def select_backend(requested: Backend | str) -> Backend:
    """Resolve ``auto``; forcing TensorRT where it cannot run raises a DependencyError."""
    requested = Backend(requested.value if isinstance(requested, Backend) else requested)
    if requested is Backend.TENSORRT:
        _deps.require_tensorrt_backend()
        return requested
    if requested is Backend.ONNXRUNTIME:
        return requested
    reason = _deps.tensorrt_unavailable_reason()
    if reason is None:
        logger.info("backend: tensorrt (TensorRT and a CUDA device are available)")
        return Backend.TENSORRT
    logger.info("backend: onnxruntime on the CPU, because %s", reason)
    return Backend.ONNXRUNTIME


def make_backend(
    kind: Backend,
    onnx_model: onnx.ModelProto,
    spec: ModuleSpec,
    config: BuildConfig,
    engine: bytes | None = None,
    *,
    allow_fallback: bool = False,
) -> tuple[Any, bytes | None]:
    """Create the backend object; for TensorRT, build (or reuse) the engine first.

    A given engine (from a module file) that this machine's TensorRT or GPU
    cannot load is rebuilt from the ONNX graph, with a warning. With
    ``allow_fallback`` (``backend="auto"``), an engine whose outputs have
    data-dependent shapes runs under ONNX Runtime instead, with a log line.
    """
    if kind is Backend.TENSORRT:
        from .runtime import DataDependentShapeError

        try:
            return _tensorrt_backend(onnx_model, spec, config, engine)
        except DataDependentShapeError as exc:
            if not allow_fallback:
                raise
            logger.info("backend: onnxruntime on the CPU, because %s", first_line(exc))
    from .backends.onnxruntime import OnnxRuntimeBackend

    # The backend emulates TensorRT's FP16 tensors (ORT's CPU provider would run most FP16 ops in FP32).
    # Keep an engine read from a file, so that saving or exporting the module again keeps it.
    return OnnxRuntimeBackend(onnx_model, emulate_fp16=True), engine


def _tensorrt_backend(
    onnx_model: onnx.ModelProto, spec: ModuleSpec, config: BuildConfig, engine: bytes | None
) -> tuple[Any, bytes]:
    from .builder import build_engine
    from .errors import EngineError
    from .runtime import DataDependentShapeError, TensorRTBackend

    # Recorded with the engine, so that loading a saved version-compatible engine allows its host code.
    trt_info = spec.info.setdefault("tensorrt", {"version_compatible": config.version_compatible})
    if engine is not None:
        options = {"cuda_graph": config.cuda_graph, "allow_host_code": bool(trt_info["version_compatible"])}
        try:
            return TensorRTBackend(engine, spec, **options), engine
        except DataDependentShapeError:
            raise
        except EngineError as exc:
            logger.warning("the saved engine cannot be used here, rebuilding it from the ONNX graph: %s", exc)
    engine = build_engine(onnx_model, spec.profiles, config)
    # The engine is new: what it needs comes from the config it was just built with, not from the file.
    spec.info["tensorrt"] = {"version_compatible": config.version_compatible}
    options = {"cuda_graph": config.cuda_graph, "allow_host_code": config.version_compatible}
    return TensorRTBackend(engine, spec, **options), engine


def _example_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs is a {type(example_inputs).__name__}; pass a tuple of tensors, e.g. (x,)"
    )


MODEL_FORMS = (
    "a torch.nn.Module, a TorchScript module, a torch.export.ExportedProgram, an onnx.ModelProto, "
    "or a path to a .onnx file, a torch.jit.save archive or a torch.export.save .pt2 file"
)


def load_source(model: Any) -> Any:
    """Resolve a path into the model object it holds; check the object is a supported form."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise InputError(f"model path {path} does not exist")
        if path.suffix == ".onnx":
            return read_onnx_file(path)
        if path.suffix == ".pt2":
            return torch.export.load(str(path))
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError or pickle errors for non-archives
            raise InputError(
                f"{path} is not a torch.jit.save archive ({first_line(exc)}); pass {MODEL_FORMS}. "
                "A state_dict or a torch.save'd nn.Module has to be loaded into its class first"
            ) from exc
    if isinstance(model, (torch.nn.Module, torch.export.ExportedProgram, onnx.ModelProto)):
        return model
    raise InputError(f"model is a {type(model).__name__}; trtopt.compile takes {MODEL_FORMS}")


def read_onnx_file(path: str | os.PathLike[str], load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file (external data from beside it); a file that is not ONNX is a GraphError naming it."""
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf's DecodeError, OSError, onnx's ValidationError for missing data
        raise GraphError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {first_line(exc)}); "
            "it may be truncated or corrupt, or not an ONNX file. Export it again (torch.onnx.export) "
            "or pass the torch model instead"
        ) from exc


def _onnx_source(
    model: onnx.ModelProto, dynamic_shapes: Any
) -> tuple[onnx.ModelProto, list[str], dict[str, Any], tuple[ShapeProfile, ...]]:
    """An ONNX model needs no export: its input names key dynamic_shapes, outputs come back flat."""
    shapes = graph_input_shapes(model)
    # A dynamic dim gets a placeholder size here; check_profiles_against_graph then insists that
    # dynamic_shapes gives it a range.
    example_shapes = {n: tuple(d if isinstance(d, int) else 1 for d in dims) for n, dims in shapes.items()}
    profiles = build_profiles(dynamic_shapes, example_shapes)
    outputs = [o.name for o in model.graph.output]
    structure: dict[str, Any] = (
        {"type": "tensor"}
        if len(outputs) == 1
        else {"type": "tuple", "items": [{"type": "tensor"}] * len(outputs)}
    )
    return model, list(shapes), structure, profiles


def compile(  # noqa: A001 - the public name the design card fixes
    model: Any,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    precision: Precision | str | None = None,
    dynamic_shapes: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    calibration_data: Any = None,
    backend: Backend | str | None = None,
    config: BuildConfig | None = None,
    accuracy_budget: Any = None,
    validation_data: Any = None,
    **overrides: Any,
) -> CompiledModule:
    """Compile a model into a fast callable.

    ``model`` is a ``torch.nn.Module``, a TorchScript module, a
    ``torch.export.ExportedProgram``, an ``onnx.ModelProto``, or a path to any of
    them saved (``.onnx``, ``torch.jit.save`` archive, ``torch.export.save`` ``.pt2``).
    ``example_inputs`` (a tuple of positional tensors) is needed for the torch forms
    (an ExportedProgram falls back to its own examples) and ignored for ONNX.
    ``precision`` and ``backend`` default to the config's (``"fp32"``, ``"auto"``);
    any other ``BuildConfig`` field may be given as a keyword override.
    ``dynamic_shapes`` maps an input name (forward argument, or ONNX graph input) to
    ``{dim: (min, opt, max)}``; a list of such dicts gives several optimization profiles.
    ``accuracy_budget`` (INT8 and FP8: an ``AccuracyBudget`` or a string such as
    ``"cosine>=0.99"``) keeps the fewest weighted layers out of INT8/FP8 that meet it,
    judged on ``validation_data`` (default: the last fifth of the calibration batches,
    held back from calibration).
    """
    config = config or BuildConfig()
    if precision is not None:
        overrides["precision"] = precision
    if backend is not None:
        overrides["backend"] = backend
    config = config.replace(**overrides)
    source = load_source(model)
    if not (isinstance(source, onnx.ModelProto) and _carried_precision(source)):
        _check_calibration_source(config, calibration_data)
    kind = select_backend(config.backend)
    if kind is Backend.TENSORRT and config.precision is Precision.FP8:
        from .builder import require_fp8_support

        require_fp8_support(_deps.tensorrt())  # before the (slow) export and calibration

    start = time.perf_counter()
    if isinstance(source, onnx.ModelProto):
        onnx_model, names, structure, profiles = _onnx_source(source, dynamic_shapes)
        exporter = "onnx"
    else:
        if example_inputs is None and isinstance(source, torch.export.ExportedProgram):
            example_inputs = source.example_inputs[0] if source.example_inputs else None
        if example_inputs is None:
            raise InputError(
                f"example_inputs is required to export a {type(source).__name__}; pass a tuple of tensors"
            )
        examples = _example_tuple(example_inputs)
        names = forward_input_names(source, len(examples))
        check_example_inputs(names, examples)
        profiles = build_profiles(dynamic_shapes, {n: tuple(t.shape) for n, t in zip(names, examples)})
        exported = export(source, examples, profiles, config.opset, input_names=names)
        onnx_model, structure, exporter = exported.model, exported.output_structure, exported.exporter
    onnx_model, report = cleanup(onnx_model)
    # Every later pass, report, TensorRT layer and error names nodes after their torch module paths.
    onnx_model = assign_names(onnx_model, source=f"the {exporter} graph" if exporter != "onnx" else "the ONNX model")
    graph_shapes = graph_input_shapes(onnx_model)
    unused = [n for n in names if n not in graph_shapes]
    if unused:
        raise ConfigError(
            f"forward argument(s) {unused} do not reach any output, so the exported graph has no "
            "such input; remove them from forward() or from example_inputs"
        )
    profiles = tuple(ShapeProfile(tuple(p[n] for n in graph_shapes)) for p in profiles)
    check_profiles_against_graph(profiles, graph_shapes)
    onnx_model, precision_report = _apply_precision(
        onnx_model, config, calibration_data, accuracy_budget, validation_data
    )

    graph_inputs = {t.name: t for t in tensor_specs(onnx_model.graph.input)}
    spec = ModuleSpec(
        inputs=tuple(graph_inputs[n] for n in names),
        outputs=tensor_specs(onnx_model.graph.output),
        output_structure=structure,
        profiles=profiles,
        precision=precision_report.get("precision", config.precision.value),
        info={
            "exporter": exporter,
            "opset": next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), None),
            "cleanup": report.summary(),
            "precision": precision_report,
            "build_config": _engine_config_json(config),
        },
    )
    backend_obj, engine = make_backend(
        kind, onnx_model, spec, config, allow_fallback=Backend(config.backend) is Backend.AUTO
    )
    logger.info(
        "compiled %s: %s, %s, %.1f s",
        type(source).__name__,
        spec.precision,
        backend_obj.name,
        time.perf_counter() - start,
    )
    return CompiledModule(onnx_model, spec, backend_obj, engine)


def _check_calibration_source(config: BuildConfig, calibration_data: Any) -> None:
    """Fail before the (slow) export when INT8 or FP8 has nothing to take its scales from."""
    cache = config.calibration_cache
    if config.precision.quantized and calibration_data is None and not (cache and os.path.isfile(cache)):
        raise CalibrationError(
            f"precision={config.precision.value!r} needs activation ranges: pass calibration_data (an iterable of input "
            "batches such as a DataLoader, a few hundred representative samples) or "
            "calibration_cache=<path of an existing TensorRT calibration cache for this model>"
            + (f" ({cache} does not exist)" if cache else "")
        )


def _apply_precision(
    onnx_model: onnx.ModelProto,
    config: BuildConfig,
    calibration_data: Any,
    accuracy_budget: Any = None,
    validation_data: Any = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Write the requested precision into the graph (TensorRT 11 reads it only from there).

    FP16: cast to FP16 with an FP32 keep-list measured on ``calibration_data``
    (optional; without it only weights and exclusions decide, and nothing is
    checked for Inf/NaN). INT8 and FP8: Q/DQ pairs with scales from the calibrator
    (needs ``calibration_data`` or an existing ``calibration_cache``), the rest
    in ``config.int8_float_precision``; with ``accuracy_budget``, the units the
    search keeps high stay out of INT8. Returns the graph and the report that
    ``CompiledModule.precision_report`` shows.
    """
    from . import precision as passes

    if accuracy_budget is not None and not config.precision.quantized:
        raise ConfigError(
            f"accuracy_budget applies to precision='int8' or 'fp8' (it chooses which layers leave INT8/FP8), "
            f"not to precision={config.precision.value!r}"
        )
    carried = _carried_precision(onnx_model)
    if carried is not None:
        if accuracy_budget is not None or config.precision.value not in ("fp32", carried):
            raise ConfigError(
                f"the graph already carries its precision ({carried}: it has "
                f"{'FP16 casts or weights' if carried == 'fp16' else 'Q/DQ nodes'}), so precision="
                f"{config.precision.value!r}{' with an accuracy_budget' if accuracy_budget is not None else ''} "
                "cannot be applied to it; compile the FP32 model instead, or this graph without those settings"
            )
        # A graph exported by export_onnx (or quantized elsewhere): build it as it is, no recalibration.
        from .precision import validate_qdq

        logger.info("the graph already carries its precision (%s); not applying precision passes", carried)
        return onnx_model, {"precision": carried, "from_graph": True, "qdq_nodes": validate_qdq(onnx_model)}
    if config.precision is Precision.FP32:
        if calibration_data is not None:
            logger.info("calibration_data is ignored at fp32")
        return onnx_model, {}
    inputs = tensor_specs(onnx_model.graph.input)
    budget = None
    if accuracy_budget is not None:
        from .precision.budget import AccuracyBudget

        budget = accuracy_budget if isinstance(accuracy_budget, AccuracyBudget) else AccuracyBudget.parse(str(accuracy_budget))
    held_out = None
    if calibration_data is not None or validation_data is not None:
        calibration_data, held_out = _hold_back(
            onnx_model, calibration_data, validation_data, inputs, config.calibration_batches, required=budget is not None
        )
    batches = None
    if calibration_data is not None:
        calibration_data, batches = passes.feed_batches(calibration_data, inputs, config.calibration_batches)
    excluded = {"exclude_nodes": config.exclude_nodes, "exclude_op_types": config.exclude_op_types}
    if config.precision is Precision.FP16:
        if batches is None:
            logger.warning(
                "precision='fp16' without calibration_data: the FP32 keep-list only covers weights "
                "and exclusions, and the graph is not checked for overflow; pass calibration_data"
            )
        converted, fp16_report = passes.to_fp16(
            onnx_model, batches, threshold=config.fp16_threshold, **excluded
        )
        report = {"precision": "fp16", "qdq_nodes": 0, "overflow_checked": batches is not None, **fp16_report.to_json()}
        if held_out is not None:
            report["accuracy"] = held_out.readout(converted, "fp16", lambda: [
                "Try exclude_nodes=[...] for the layers that overflow, a lower fp16_threshold, or precision='fp32'."
            ])
        return converted, report

    fmt = passes.quant_format(config.precision)
    # The plan's options, format included: the accuracy budget re-plans with the same ones.
    plan_options = {
        "fmt": fmt.name, "keep_first_last": config.int8_keep_first_last,
        "quantize_attention": config.int8_attention, **excluded,
    }
    plan = passes.plan_int8(onnx_model, **plan_options)
    from .calibrators import calibrate

    groups = {}
    if config.smoothquant is not None:
        from .precision.smoothquant import smoothable_groups

        groups = smoothable_groups(onnx_model, plan)
    start = time.perf_counter()
    calibration = calibrate(
        onnx_model,
        plan.activation_tensors,
        calibration_data,
        input_specs=inputs,
        method=config.calibration_method.value,
        percentile=config.percentile,
        max_batches=config.calibration_batches,
        cache_path=config.calibration_cache,
        progress=logger.isEnabledFor(logging.INFO),
        channel_max_for=list(groups),
    )
    seconds = time.perf_counter() - start
    amax, smoothed, smoothed_ranges = dict(calibration.amax), [], {}
    if groups:
        from .precision.smoothquant import smooth

        onnx_model, smoothed_ranges, smoothed = smooth(onnx_model, groups, calibration.channel_max, config.smoothquant)
        amax.update(smoothed_ranges)
        # The units now read the smoothed tensors: plan again, every other Q/DQ stays where it was.
        plan = passes.plan_int8(onnx_model, **plan_options)
    budget_report = None
    float_precision = config.int8_float_precision.value
    built: dict[frozenset[str], tuple[Any, Any, Any]] = {}  # the latest module the search built

    def build(kept: frozenset[str] = frozenset()) -> tuple[Any, Any, Any]:
        """The INT8 module as compiled, with the units in ``kept`` left out of INT8."""
        from .precision.budget import keep_high

        ops = {n.name: n.op_type for n in onnx_model.graph.node}
        chosen = keep_high(plan, kept, ops, node_modules(onnx_model)) if kept else plan
        result = passes.to_int8(
            onnx_model, chosen, amax, batches,
            float_precision=float_precision, threshold=config.fp16_threshold, **excluded,
        )
        built.clear()
        built[kept] = result
        return result

    if budget is not None:
        from .precision.budget import FinalModule, find_units_to_keep_high

        # The analysis measures INT8's error alone (FP32 float part). The module as built adds its
        # FP16 float part, so the search measures it too, and keeps more units high while it misses.
        final = FinalModule(f"{float_precision} threshold={config.fp16_threshold:g}", lambda kept: build(kept)[0])
        budget_report = find_units_to_keep_high(
            onnx_model,
            amax,
            held_out.feeds,
            held_out.labels,
            budget,
            plan_options=plan_options,
            cache_dir=config.sensitivity_cache_dir,
            reference=held_out.reference,
            final=final,
        )
        kept = frozenset(budget_report.kept_high)
        quantized, int8_report, fp16_report = built[kept] if kept in built else build(kept)
    else:
        quantized, int8_report, fp16_report = build()
    report = {
        "precision": fmt.name,
        "calibrator": config.calibration_method.value,
        "calibration_seconds": round(seconds, 3),
        "calibration_batches": calibration.num_batches,
        "calibration_from_cache": calibration.from_cache,
        "float_precision": config.int8_float_precision.value,
        "overflow_checked": batches is not None and fp16_report is not None,
        **({"percentile": config.percentile} if config.calibration_method.value == "percentile" else {}),
        **int8_report.to_json(),
    }
    if fp16_report is not None:
        report.update(fp16_report.to_json())
    # Kept so that export_onnx can write TensorRT's calibration cache next to an INT8 graph.
    report["activation_amax"] = {name: amax[name] for name in plan.activation_tensors}
    if smoothed:
        report["smoothquant"] = {"alpha": config.smoothquant, "tensors": [t.to_json() for t in smoothed]}
    # Checked ranges of the tensors quantized as calibrated (a smoothed tensor's range is max |x / s|).
    checks = {
        name: calibration.checks[name]
        for name in plan.activation_tensors
        if name in calibration.checks and name not in smoothed_ranges
    }
    if checks:
        # Each range with the module of the layer it feeds (its quantized tensor keeps its ONNX name).
        modules = node_modules(onnx_model)
        report["range_checks"] = {
            name: {**check.to_json(), **_module_of_use(plan, name, modules)} for name, check in checks.items()
        }
    if budget_report is not None:
        from .precision.budget import check_final

        # The search measured this very module (or its cached twin): no need to run it again.
        check_final(budget_report, quantized, held_out.reference, held_out.feeds, held_out.labels, budget, value=budget_report.final)
        report["accuracy_budget"] = budget_report.to_json()
    if held_out is not None:
        report["accuracy"] = held_out.readout(
            quantized, fmt.name, lambda: _int8_hints(onnx_model, amax, checks, calibration, plan, held_out.feeds, inputs)
        )
    return quantized, report


@dataclass
class _HeldOut:
    """Batches the ranges were not calibrated on, with the FP32 graph's outputs on them."""

    feeds: list[dict[str, Any]]
    labels: Any
    reference: list[Any]
    held_back: bool

    def readout(self, graph: onnx.ModelProto, precision: str, hints: Callable[[], list[str]]) -> dict[str, Any]:
        """Measure ``graph`` against FP32 and log the result; ``hints()`` (what to try, run only
        when the module drifts: it may measure ranges again) goes into the warning."""
        from .precision.readout import log_readout, measure

        readout = measure(graph, self.reference, self.feeds, held_back=self.held_back)
        log_readout(readout, precision, [] if readout.ok else hints())
        return readout.to_json()


def _hold_back(
    onnx_model: onnx.ModelProto,
    calibration_data: Any,
    validation_data: Any,
    inputs: Sequence[Any],
    max_batches: int | None,
    *,
    required: bool,
) -> tuple[Any, _HeldOut]:
    """Split off the batches that judge the compiled module (the accuracy readout and budget).

    ``validation_data`` when given, else the last fifth of the calibration batches.
    Calibration data too small to split is used for both, and the readout says so,
    unless an accuracy budget needs held-back data (then the error says what to pass).
    """
    from .calibrators.data import iter_batches
    from .backends.onnxruntime import run_graph
    from .precision.budget import split_validation

    if isinstance(calibration_data, Iterator):
        calibration_data = list(calibration_data)  # read once: a failed split must not lose it
    try:
        calibration_data, feeds, labels = split_validation(calibration_data, validation_data, inputs, max_batches)
        held_back = True
    except ConfigError:
        if required or validation_data is not None:
            raise
        feeds, labels, held_back = [feed for _, feed in iter_batches(calibration_data, inputs, max_batches)], None, False
        logger.info("one calibration batch only: the accuracy readout is measured on it, none is held back")
    return calibration_data, _HeldOut(feeds, labels, run_graph(onnx_model, feeds), held_back)


def _int8_hints(
    model: onnx.ModelProto,
    amax: Mapping[str, float],
    checks: Mapping[str, Any],
    calibration: Any,
    plan: Any,
    feeds: Sequence[Any],
    inputs: Sequence[Any],
) -> list[str]:
    """The worst ranges (those not checked at calibration measured now) and what to try."""
    from .calibrators import check_ranges

    unchecked = {name: amax[name] for name in plan.activation_tensors if name not in checks}
    checks = {**checks, **(check_ranges(model, unchecked, feeds, input_specs=inputs) if unchecked else {})}
    worst = sorted(checks.items(), key=lambda item: (-item[1].clipped, -item[1].error))[:3]
    shown = "; ".join(f"{name!r} clips {c.clipped:.1%} of its values (error {c.error:.3g})" for name, c in worst)
    # Name the layers those ranges feed by module path (exclude_nodes takes module globs) where known.
    modules = node_modules(model)
    consumers = [modules.get(node) or node for name, _ in worst for node, _ in plan.activations.get(name, [])[:1]]
    others = " or ".join(repr(m) for m in ("auto", "minmax") if m != calibration.method)
    retry = "delete the calibration cache to calibrate again, " if calibration.from_cache else ""
    return [
        f"Worst ranges ({calibration.method}{', from the calibration cache' if calibration.from_cache else ''}): {shown}.",
        f"Try: {retry}calibrator={others}, accuracy_budget='cosine>=0.99', or exclude_nodes={consumers[:3]!r}.",
    ]


def _module_of_use(plan: Any, tensor: str, modules: Mapping[str, str]) -> dict[str, str]:
    """``{"module": ...}``: the module of the first layer reading the quantized ``tensor``, when known."""
    uses = plan.activations.get(tensor, [])
    return {"module": modules[uses[0][0]]} if uses and uses[0][0] in modules else {}


def _carried_precision(model: onnx.ModelProto) -> str | None:
    """'fp8' or 'int8' for a graph with Q/DQ nodes, 'fp16' for one computing in FP16, else None."""
    from .precision.qformat import graph_format

    fmt = graph_format(model)
    if fmt is not None:
        return fmt.name
    half = onnx.TensorProto.FLOAT16
    casts_to_half = any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == half for a in node.attribute)
        for node in model.graph.node
    )
    if casts_to_half or any(t.data_type == half for t in model.graph.initializer):
        return "fp16"
    return None


# What a rebuild on another machine needs besides the graph (kept in the module file). Paths
# (timing_cache, engine_cache_dir) are the build machine's: they are not kept, and load() ignores
# them in files written before, so a rebuild elsewhere never writes there unasked.
RUNTIME_SETTINGS = ("cuda_graph",)
MACHINE_SETTINGS = ("timing_cache", "engine_cache_dir", "engine_cache_max_bytes")


def _engine_config_json(config: BuildConfig) -> dict[str, Any]:
    values = {name: getattr(config, name) for name in (*ENGINE_SETTINGS, *RUNTIME_SETTINGS)}
    return {k: v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def load(path: str | os.PathLike[str], *, backend: Backend | str = "auto", **overrides: Any) -> CompiledModule:
    """Load a module written by ``CompiledModule.save``.

    The file holds the final ONNX graph and, when it was built, the TensorRT
    engine; with ``backend="auto"`` the engine is used where TensorRT can run,
    otherwise the graph runs under ONNX Runtime. An engine this machine cannot
    load is rebuilt with the engine settings it was compiled with; ``overrides``
    (``BuildConfig`` fields such as ``cuda_graph=True`` or ``engine_cache_dir``)
    change them.
    """
    onnx_model, spec, engine = read_module_file(path)
    stored = dict(spec.info.get("build_config", {"precision": spec.precision}))
    for name in MACHINE_SETTINGS:
        stored.pop(name, None)
    config = BuildConfig().replace(**{**stored, **overrides})
    kind = select_backend(backend)
    allow_fallback = Backend(backend.value if isinstance(backend, Backend) else backend) is Backend.AUTO
    backend_obj, engine = make_backend(kind, onnx_model, spec, config, engine, allow_fallback=allow_fallback)
    return CompiledModule(onnx_model, spec, backend_obj, engine)
