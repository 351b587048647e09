"""``compile`` and ``load``: the pipeline export -> cleanup -> precision -> backend."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import torch

from . import _deps
from .config import Backend, BuildConfig, Precision, ShapeProfile, build_profiles, check_profiles_against_graph
from .errors import CalibrationError, ConfigError, InputError
from .export import check_example_inputs, export, forward_input_names
from .graph import cleanup, graph_input_shapes
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
) -> tuple[Any, bytes | None]:
    """Create the backend object; for TensorRT, build (or reuse) the engine first."""
    if kind is Backend.TENSORRT:
        from .builder import build_engine
        from .runtime import TensorRTBackend

        if engine is None:
            engine = build_engine(onnx_model, spec.profiles, config)
        return TensorRTBackend(engine, spec), engine
    from .backends.onnxruntime import OnnxRuntimeBackend
    from .precision import emulate_fp16

    # ORT's CPU provider would run most FP16 ops in FP32; emulate TensorRT's FP16 tensors instead.
    return OnnxRuntimeBackend(emulate_fp16(onnx_model)), None


def _example_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs is a {type(example_inputs).__name__}; pass a tuple of tensors, e.g. (x,)"
    )


def compile(  # noqa: A001 - the public name the design card fixes
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    precision: Precision | str | None = None,
    dynamic_shapes: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    calibration_data: Any = None,
    backend: Backend | str | None = None,
    config: BuildConfig | None = None,
    **overrides: Any,
) -> CompiledModule:
    """Compile a PyTorch model into a fast callable.

    ``precision`` and ``backend`` default to the config's (``"fp32"``, ``"auto"``);
    any other ``BuildConfig`` field may be given as a keyword override.
    ``dynamic_shapes`` maps a forward argument name to ``{dim: (min, opt, max)}``;
    a list of such dicts gives several optimization profiles.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model is a {type(model).__name__}; trtopt.compile takes a torch.nn.Module")
    config = config or BuildConfig()
    if precision is not None:
        overrides["precision"] = precision
    if backend is not None:
        overrides["backend"] = backend
    config = config.replace(**overrides)
    _check_calibration_source(config, calibration_data)
    kind = select_backend(config.backend)

    start = time.perf_counter()
    examples = _example_tuple(example_inputs)
    names = forward_input_names(model, len(examples))
    check_example_inputs(names, examples)
    profiles = build_profiles(dynamic_shapes, {n: tuple(t.shape) for n, t in zip(names, examples)})
    exported = export(model, examples, profiles, config.opset, input_names=names)
    onnx_model, report = cleanup(exported.model)
    graph_shapes = graph_input_shapes(onnx_model)
    check_profiles_against_graph(
        [ShapeProfile(tuple(p[n] for n in graph_shapes)) for p in profiles], graph_shapes
    )
    onnx_model, precision_report = _apply_precision(onnx_model, config, calibration_data, profiles)

    graph_inputs = {t.name: t for t in tensor_specs(onnx_model.graph.input)}
    spec = ModuleSpec(
        inputs=tuple(graph_inputs[n] for n in names if n in graph_inputs),
        outputs=tensor_specs(onnx_model.graph.output),
        output_structure=exported.output_structure,
        profiles=tuple(ShapeProfile(tuple(p[n] for n in graph_inputs)) for p in profiles),
        precision=config.precision.value,
        info={
            "exporter": exported.exporter,
            "opset": config.opset,
            "cleanup": report.summary(),
            "precision": precision_report,
        },
    )
    unused = [n for n in names if n not in graph_inputs]
    if unused:
        raise ConfigError(
            f"forward argument(s) {unused} do not reach any output, so the exported graph has no "
            "such input; remove them from forward() or from example_inputs"
        )
    backend_obj, engine = make_backend(kind, onnx_model, spec, config)
    logger.info(
        "compiled %s: %s, %s, %.1f s",
        type(model).__name__,
        config.precision.value,
        backend_obj.name,
        time.perf_counter() - start,
    )
    return CompiledModule(onnx_model, spec, backend_obj, engine)


def _check_calibration_source(config: BuildConfig, calibration_data: Any) -> None:
    """Fail before the (slow) export when INT8 has nothing to take its scales from."""
    cache = config.calibration_cache
    if config.precision is Precision.INT8 and calibration_data is None and not (cache and os.path.isfile(cache)):
        raise CalibrationError(
            "precision='int8' needs activation ranges: pass calibration_data (an iterable of input "
            "batches such as a DataLoader, a few hundred representative samples) or "
            "calibration_cache=<path of an existing TensorRT calibration cache for this model>"
            + (f" ({cache} does not exist)" if cache else "")
        )


def _apply_precision(
    onnx_model: onnx.ModelProto,
    config: BuildConfig,
    calibration_data: Any,
    profiles: Sequence[ShapeProfile],
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Write the requested precision into the graph (TensorRT 11 reads it only from there).

    FP16: cast to FP16 with an FP32 keep-list measured on ``calibration_data``
    (optional; without it only weights and exclusions decide, and nothing is
    checked for Inf/NaN). INT8: Q/DQ pairs with scales from the calibrator
    (needs ``calibration_data`` or an existing ``calibration_cache``), the rest
    in ``config.int8_float_precision``. Returns the graph and the report that
    ``CompiledModule.precision_report`` shows.
    """
    from . import precision as passes

    if config.precision is Precision.FP32:
        if calibration_data is not None:
            logger.info("calibration_data is ignored at fp32")
        return onnx_model, {}
    inputs = tensor_specs(onnx_model.graph.input)
    batches = (
        None
        if calibration_data is None
        else passes.feed_batches(calibration_data, inputs, config.calibration_batches)
    )
    excluded = {"exclude_nodes": config.exclude_nodes, "exclude_op_types": config.exclude_op_types}
    if config.precision is Precision.FP16:
        if batches is None:
            logger.warning(
                "precision='fp16' without calibration_data: the FP32 keep-list only covers weights "
                "and exclusions, and the graph is not checked for overflow; pass calibration_data"
            )
        onnx_model, fp16_report = passes.to_fp16(
            onnx_model, batches, threshold=config.fp16_threshold, **excluded
        )
        return onnx_model, {"precision": "fp16", "qdq_nodes": 0, **fp16_report.to_json()}

    _check_calibration_source(config, calibration_data)
    plan = passes.plan_int8(
        onnx_model, keep_first_last=config.int8_keep_first_last, **excluded
    )
    from .calibrators import calibrate

    start = time.perf_counter()
    calibration = calibrate(
        onnx_model,
        plan.activation_tensors,
        calibration_data,
        input_specs=inputs,
        method=config.calibrator.value,
        percentile=config.percentile,
        max_batches=config.calibration_batches,
        cache_path=config.calibration_cache,
        progress=logger.isEnabledFor(logging.INFO),
    )
    seconds = time.perf_counter() - start
    onnx_model, int8_report, fp16_report = passes.to_int8(
        onnx_model,
        plan,
        calibration.amax,
        batches,
        float_precision=config.int8_float_precision.value,
        threshold=config.fp16_threshold,
        **excluded,
    )
    report = {
        "precision": "int8",
        "calibrator": config.calibrator.value,
        "calibration_seconds": round(seconds, 3),
        "float_precision": config.int8_float_precision.value,
        **int8_report.to_json(),
    }
    if fp16_report is not None:
        report.update(fp16_report.to_json())
    return onnx_model, report


def load(path: str | os.PathLike[str], *, backend: Backend | str = "auto") -> CompiledModule:
    """Load a module written by ``CompiledModule.save``.

    The file holds the final ONNX graph and, when it was built, the TensorRT
    engine; with ``backend="auto"`` the engine is used where TensorRT can run,
    otherwise the graph runs under ONNX Runtime.
    """
    onnx_model, spec, engine = read_module_file(path)
    kind = select_backend(backend)
    backend_obj, engine = make_backend(kind, onnx_model, spec, BuildConfig(precision=spec.precision), engine)
    return CompiledModule(onnx_model, spec, backend_obj, engine)
