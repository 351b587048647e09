"""``compile`` and ``load``: the pipeline export -> cleanup -> precision -> backend."""

from __future__ import annotations

import logging
import os
import time
from enum import Enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from . import _deps
from .config import ENGINE_SETTINGS, Backend, BuildConfig, Precision
from .profiles import ShapeProfile, build_profiles, check_profiles_against_graph
from .errors import CalibrationError, ConfigError, EngineError, GraphError, InputError, first_line
from .export import check_example_inputs, export, forward_input_names, resize_dim
from .graph import (
    cleanup,
    discard_weights_dir,
    prune_weights_dir,
    graph_input_shapes,
    load_weights,
    needs_external_data,
    offload_weights,
    weights_dir,
)
from .names import assign_names
from .module import CompiledModule, read_module_file
from .stages import StageTimer
from .spec import ModuleSpec, tensor_specs
from .backends.onnxruntime import OnnxRuntimeBackend
from .executor.session import cpu_session, reusing_sessions
from .builder import (
    build_engine,
    engine_record,
    saved_engine_problem,
    require_fp8_support,
    require_weight_only_support,
)
from .runtime import TensorRTBackend
from .precision import apply_precision, carried_precision
from .executor.call_checks import kernel_failure
from .executor.qdq_cpu import is_cpu_layout

if TYPE_CHECKING:
    from .calibrators.data import CalibrationData
    from .precision.budget import AccuracyBudget

logger = logging.getLogger(__name__)


def select_backend(requested: Backend | str, *, cpu_layout: bool = False) -> Backend:
    """Resolve ``auto``; forcing TensorRT where it cannot run raises a DependencyError.

    A graph in the CPU INT8 layout (``int8_layout="cpu"``) runs on ONNX Runtime only:
    ``auto`` resolves to it, and ``tensorrt`` is a ConfigError (TensorRT cannot build it).
    """
    requested = Backend(requested.value if isinstance(requested, Backend) else requested)
    if cpu_layout:
        if requested is Backend.TENSORRT:
            raise ConfigError(
                "this module's INT8 graph is in the CPU layout (int8_layout='cpu', uint8 activations with "
                "zero points), which TensorRT cannot build: use backend='onnxruntime', or compile again "
                "with int8_layout='tensorrt' for TensorRT"
            )
        return Backend.ONNXRUNTIME
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
    allow_host_code: bool = False,
) -> tuple[Any, bytes | None]:
    """Create the backend object; for TensorRT, build (or reuse) the engine first.

    A given engine (from a module file) is used only where it was built for:
    the same TensorRT and GPU (unless built version- or hardware-compatible),
    and, when it is version-compatible, only with ``allow_host_code`` (it runs
    the lean runtime's code embedded in the file). Otherwise, or when TensorRT
    cannot load it, it is rebuilt from the ONNX graph with one warning saying why.
    """
    if kind is Backend.TENSORRT:
        return _tensorrt_backend(onnx_model, spec, config, engine, allow_host_code)
    # The backend emulates TensorRT's FP16 tensors (ORT's CPU provider would run most FP16 ops in FP32).
    # Keep an engine read from a file, so that saving or exporting the module again keeps it.
    return OnnxRuntimeBackend(onnx_model, emulate_fp16=True, int4_accuracy_level=config.int4_cpu_accuracy_level), engine


def _tensorrt_backend(
    onnx_model: onnx.ModelProto,
    spec: ModuleSpec,
    config: BuildConfig,
    engine: bytes | None,
    allow_host_code: bool,
) -> tuple[Any, bytes]:
    if engine is not None:
        problem = saved_engine_problem(spec.info.get("tensorrt"), allow_host_code=allow_host_code)
        if problem is None:
            try:
                options = {"cuda_graph": config.cuda_graph, "allow_host_code": allow_host_code}
                return TensorRTBackend(engine, spec, **options), engine
            except EngineError as exc:
                problem = f"this machine's TensorRT cannot load it: {exc}"
        logger.warning("the saved engine is not used, rebuilding it from the ONNX graph: %s", problem)
    # Engines built here, or cached by builds here, are trusted: a version-compatible one may run its host code.
    options = {"cuda_graph": config.cuda_graph, "allow_host_code": config.version_compatible}
    loaded: list[Any] = []

    def accept_cached(candidate: bytes) -> bool:
        try:
            loaded.append(TensorRTBackend(candidate, spec, **options))
        except EngineError as exc:
            logger.debug("cached engine refused: %s", exc)
            return False
        return True

    engine = build_engine(onnx_model, spec.profiles, config, accept_cached=accept_cached)
    # The engine is new: what it needs and where it runs come from this build, not from the file.
    spec.info["tensorrt"] = engine_record(config)
    return (loaded[0] if loaded else TensorRTBackend(engine, spec, **options)), engine


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


@dataclass
class _Graph:
    """The cleaned, named ONNX graph of a model source, with what the module spec needs from the export."""

    model: onnx.ModelProto
    input_names: list[str]
    output_structure: dict[str, Any]
    profiles: tuple[ShapeProfile, ...]
    exporter: str
    cleanup_summary: Any
    source_kind: str  # the model's type name, for the log


# A graph a compile runs twice in a row (shape check, FP32 reference; readout, CPU backend) loads once.
@reusing_sessions()
def compile(  # noqa: A001 - the public name docs/design.md fixes
    model: Any,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    precision: Precision | str | None = None,
    dynamic_shapes: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    calibration_data: CalibrationData | None = None,
    backend: Backend | str | None = None,
    config: BuildConfig | None = None,
    accuracy_budget: AccuracyBudget | str | None = None,
    validation_data: CalibrationData | None = None,
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
    config = _resolved_config(config, precision, backend, overrides)
    source = load_source(model)
    if not (isinstance(source, onnx.ModelProto) and carried_precision(source)):
        _check_calibration_source(config, calibration_data)
    kind = select_backend(config.backend, cpu_layout=config.int8_layout == "cpu")
    if kind is Backend.TENSORRT and config.precision is Precision.FP8:
        require_fp8_support(_deps.tensorrt())  # before the (slow) export and calibration
    if kind is Backend.TENSORRT and config.precision.weight_only:
        _deps.tensorrt()
        require_weight_only_support(config.precision.value)

    start = time.perf_counter()
    timer = StageTimer()
    with timer.stage("export and cleanup"):
        graph = _graph_of(source, example_inputs, dynamic_shapes, config)
    del source  # a model read from a file is not needed past export
    try:
        onnx_model = graph.model
        if weights_dir(onnx_model) is not None and config.precision.weight_only:
            onnx_model = load_weights(onnx_model)  # the INT4/NVFP4 passes rewrite weights in memory
        onnx_model, report = apply_precision(
            onnx_model, config, calibration_data, accuracy_budget, validation_data, timer=timer
        )
        if weights_dir(onnx_model) is None and needs_external_data(onnx_model):
            onnx_model = offload_weights(onnx_model, weights_dir(graph.model))
        spec = _module_spec(onnx_model, graph, report.precision or config.precision.value, report.to_json(), config)
        with timer.stage("backend"):
            backend_obj, engine = make_backend(kind, onnx_model, spec, config)
        prune_weights_dir(onnx_model)  # the passes' and sessions' intermediate weight files
        spec.info["stage_seconds"] = timer.to_json()
        module = CompiledModule(onnx_model, spec, backend_obj, engine)
    finally:
        discard_weights_dir(weights_dir(graph.model))  # a failed compile's weights on disk (unless held)
    logger.info(
        "compiled %s: %s, %s, %.1f s",
        graph.source_kind,
        spec.precision,
        backend_obj.name,
        time.perf_counter() - start,
    )
    return module


def _resolved_config(
    config: BuildConfig | None, precision: Any, backend: Any, overrides: dict[str, Any]
) -> BuildConfig:
    """``config`` (default ``BuildConfig()``) with ``compile``'s keywords applied."""
    if precision is not None:
        overrides["precision"] = precision
    if backend is not None:
        overrides["backend"] = backend
    return (config or BuildConfig()).replace(**overrides)


def _graph_of(source: Any, example_inputs: Any, dynamic_shapes: Any, config: BuildConfig) -> _Graph:
    """Export (unless ``source`` is ONNX), clean up and name the graph; fit the profiles to its inputs."""
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
        del exported  # the only other reference to the exported weights
    if weights_dir(onnx_model) is None and needs_external_data(onnx_model):
        # From 256 MiB (EXTERNAL_DATA_THRESHOLD) the weights move to a file now and stay there through every pass (trtopt.graph).
        onnx_model = offload_weights(onnx_model)
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
    if config.check_shapes:
        examples_by_name = None if isinstance(source, onnx.ModelProto) else dict(zip(names, examples))
        check_profile_shapes(onnx_model, profiles, examples_by_name)
    return _Graph(onnx_model, names, structure, profiles, exporter, report.summary(), type(source).__name__)


_PROFILE_POINTS = ("min", "opt", "max")


def check_profile_shapes(
    onnx_model: onnx.ModelProto,
    profiles: Sequence[ShapeProfile],
    examples: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Run the graph under ONNX Runtime at every profile's min, opt and max shapes.

    The exporter only proves the graph at the example's shape, and a dynamic range
    can go where the model cannot (a BERT with 32 position embeddings has no 64th
    position): that would compile and then fail at call time inside a kernel. The
    inputs are the examples resized to each shape (their slices repeated, so values
    stay realistic), or ones for an ONNX source (valid token ids and masks). A
    graph ONNX Runtime cannot load here is left to the backend to report.
    """
    if all(r.min == r.max for p in profiles for r in p.inputs):
        return  # static: the export already ran at the only shape
    try:
        # prepack=False: a measuring session (it still prepacks a graph held in memory, which the FP32
        # reference outputs of hold_back then reuse)
        session = cpu_session(onnx_model, prepack=False)
    except EngineError as exc:
        logger.debug("profile shapes not checked: %s", exc)
        return
    dtypes = {i.name: i.type for i in session.get_inputs()}
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4  # the ConfigError below says it; ORT's error log line would repeat it
    names = [r.name for r in profiles[0].inputs]
    done: dict[tuple[tuple[int, ...], ...], str] = {}
    for index, profile in enumerate(profiles):
        for point in _PROFILE_POINTS:
            shapes = tuple(tuple(getattr(profile[n], point)) for n in names)
            if shapes in done:
                continue
            feeds = {}
            for name, shape in zip(names, shapes):
                if examples is not None and name in examples:
                    tensor = examples[name].detach().cpu()
                    if tensor.dtype == torch.bfloat16:  # numpy has none; the session takes BF16 as FP32, exactly
                        tensor = tensor.float()
                    for d, size in enumerate(shape):
                        tensor = resize_dim(tensor, d, size)
                    feeds[name] = tensor.contiguous().numpy()
                else:
                    feeds[name] = np.ones(shape, dtype=_ORT_NUMPY_TYPES.get(dtypes[name], np.float32))
            try:
                session.run(None, feeds, run_options)
            except Exception as exc:  # onnxruntime raises its own exception types
                worked = ", ".join(f"{p} {_shapes_text(names, s)}" for s, p in done.items()) or "no other shape"
                raise ConfigError(
                    f"dynamic_shapes lets the model take {_shapes_text(names, shapes)} (profile {index} {point}), "
                    f"but the model cannot run at that shape: {kernel_failure(exc)}. It ran at {worked}. "
                    "Narrow the range in dynamic_shapes to what the model supports (a sequence no longer "
                    "than its position embeddings, an image size its layers divide); if it fails only on these "
                    "stand-in inputs (examples resized, or ones), pass check_shapes=False"
                ) from None
            done[shapes] = f"profile {index} {point}"
    logger.debug("the graph runs at every profile's min, opt and max shapes (%d shape sets)", len(done))


# ONNX Runtime's input type strings -> numpy (bool and integer inputs get ones: valid ids, masks).
_ORT_NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _shapes_text(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> str:
    return ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes))


def _module_spec(
    onnx_model: onnx.ModelProto, graph: _Graph, precision: str, precision_json: dict[str, Any], config: BuildConfig
) -> ModuleSpec:
    """The spec a module file keeps: its tensors, profiles, precision and how it was made."""
    graph_inputs = {t.name: t for t in tensor_specs(onnx_model.graph.input)}
    return ModuleSpec(
        inputs=tuple(graph_inputs[n] for n in graph.input_names),
        outputs=tensor_specs(onnx_model.graph.output),
        output_structure=graph.output_structure,
        profiles=graph.profiles,
        precision=precision,
        info={
            "exporter": graph.exporter,
            "opset": next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), None),
            "cleanup": graph.cleanup_summary,
            "precision": precision_json,
            "build_config": _engine_config_json(config),
        },
    )


def _check_calibration_source(config: BuildConfig, calibration_data: CalibrationData | None) -> None:
    """Fail before the (slow) export when INT8 or FP8 has nothing to take its scales from."""
    cache = config.calibration_cache
    if config.precision.quantized and calibration_data is None and not (cache and os.path.isfile(cache)):
        raise CalibrationError(
            f"precision={config.precision.value!r} needs activation ranges: pass calibration_data (an iterable of input "
            "batches such as a DataLoader, a few hundred representative samples) or "
            "calibration_cache=<path of an existing TensorRT calibration cache for this model>"
            + (f" ({cache} does not exist)" if cache else "")
        )


# What a rebuild on another machine needs besides the graph (kept in the module file). Paths
# (timing_cache, engine_cache_dir) are the build machine's: they are not kept, and load() ignores
# them in files written before, so a rebuild elsewhere never writes there unasked.
RUNTIME_SETTINGS = ("cuda_graph", "int4_cpu_accuracy_level")
MACHINE_SETTINGS = ("timing_cache", "engine_cache_dir", "engine_cache_max_bytes")


def _engine_config_json(config: BuildConfig) -> dict[str, Any]:
    values = {name: getattr(config, name) for name in (*ENGINE_SETTINGS, *RUNTIME_SETTINGS)}
    return {k: v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def load(
    path: str | os.PathLike[str],
    *,
    backend: Backend | str = "auto",
    allow_host_code: bool = False,
    **overrides: Any,
) -> CompiledModule:
    """Load a module written by ``CompiledModule.save``.

    The file holds the final ONNX graph and, when it was built, the TensorRT
    engine; with ``backend="auto"`` the engine is used where TensorRT can run,
    otherwise the graph runs under ONNX Runtime. An engine built for another
    TensorRT or GPU, or that this machine cannot load, is rebuilt with the
    engine settings it was compiled with; ``overrides`` (``BuildConfig`` fields
    such as ``cuda_graph=True`` or ``engine_cache_dir``) change them.

    A version-compatible engine carries the lean runtime's native code, which
    TensorRT runs only when host code is allowed: pass ``allow_host_code=True``
    for files you trust (the file's checksums prove it is intact, not who made
    it). Without it, such an engine is rebuilt from the graph instead.
    """
    onnx_model, spec, engine = read_module_file(path)
    stored = dict(spec.info.get("build_config", {"precision": spec.precision}))
    for name in MACHINE_SETTINGS:
        stored.pop(name, None)
    config = BuildConfig().replace(**{**stored, **overrides})
    kind = select_backend(backend, cpu_layout=is_cpu_layout(onnx_model))
    backend_obj, engine = make_backend(kind, onnx_model, spec, config, engine, allow_host_code=allow_host_code)
    prune_weights_dir(onnx_model)  # the backend session's FP16-emulation copies
    return CompiledModule(onnx_model, spec, backend_obj, engine)
