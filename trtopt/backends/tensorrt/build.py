"""ONNX -> serialized TensorRT engine (strongly typed, with optimization profiles).

One code path serves TensorRT 10.x and 11.x (docs/gpu.md): the network is
created with ``STRONGLY_TYPED`` only, so the precision is whatever the ONNX
graph says (FP16 casts, INT8 or FP8 Q/DQ); no weak-typing flag is ever touched.
FP8 graphs are refused up front where the GPU or TensorRT cannot run them.

We call TensorRT directly here rather than through Polygraphy's loaders
(``NetworkFromOnnxPath``, ``CreateConfig``, ``EngineBytesFromNetwork``) because
(1) a failed parse or build must raise our ``BuildError`` carrying the errors
TensorRT logged during *this* build, while Polygraphy routes TensorRT's logger
into its global ``G_LOGGER`` and fails by raising through it; (2) each profile
must be checked against the parsed network's inputs with our message; and
(3) the API-surface test (tests/test_trt_api_surface.py) can only vouch for
TensorRT calls this module makes itself. The calls are few.

TensorRT's logger bridge, shared with the runtime, is in ``trt_logging``. Classes
that subclass TensorRT types (the progress monitor here) are created inside
factory functions, so importing trtopt never needs TensorRT.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx
import torch

from ... import _deps
from ...config import BuildConfig
from ...profiles import InputRange, ShapeProfile
from .engine_cache import EngineCache, engine_key_fields, files_digest
from ...errors import BuildError, DependencyError, first_line
from ...files import atomic_write
from ...graph import save_model
from .trt_logging import format_errors, tensorrt_logger
from ...precision import FP8, carried_precision, graph_format, validate_qdq

logger = logging.getLogger("trtopt.builder")  # the public face's name, which docs/gpu.md gives
PROGRESS_INTERVAL_S = 10.0
# What ``configure`` sets beyond the config's own fields, versioned: part of the engine-cache key,
# so a change here (2: TF32 cleared unless BuildConfig.tf32) never reuses engines built before it.
BUILDER_SETTINGS_VERSION = 2


# --------------------------------------------------------------- build progress
def make_progress_monitor(trt: ModuleType, interval_s: float = PROGRESS_INTERVAL_S) -> Any:
    """Create a ``trt.IProgressMonitor`` that logs the build's phases at INFO, at most every ``interval_s``.

    Like the logger, its callbacks never raise; ``step_complete`` always returns
    True (False would cancel the build).
    """

    # trt is the tensorrt module, passed in (it has no stubs): mypy cannot resolve a base class read from it.
    class BuildProgressLog(trt.IProgressMonitor):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}
            self._start = time.monotonic()
            self._last = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                self._steps[phase_name] = int(num_steps)
                level = logging.INFO if parent_phase is None else logging.DEBUG
                logger.log(level, "TensorRT build: %s (%d steps)", phase_name, num_steps)
            except BaseException:  # noqa: BLE001
                pass

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                now = time.monotonic()
                if now - self._last >= interval_s:
                    self._last = now
                    logger.info(
                        "TensorRT build: %s step %d/%s, %.0f s so far",
                        phase_name,
                        step + 1,
                        self._steps.get(phase_name, "?"),
                        now - self._start,
                    )
            except BaseException:  # noqa: BLE001
                pass
            return True

        def phase_finish(self, phase_name: str) -> None:
            try:
                self._steps.pop(phase_name, None)
            except BaseException:  # noqa: BLE001
                pass

    return BuildProgressLog()


@contextlib.contextmanager
def heartbeat(interval_s: float = PROGRESS_INTERVAL_S) -> Iterator[None]:
    """Log "still building" every ``interval_s`` (for a TensorRT without IProgressMonitor)."""
    stop = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not stop.wait(interval_s):
            logger.info("TensorRT build still running, %.0f s so far", time.monotonic() - start)

    thread = threading.Thread(target=beat, name="trtopt-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------- device facts
def current_device_index() -> int:
    """The CUDA device torch uses (0 when torch has no CUDA); engines are built and run there."""
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def tensorrt_build(trt: ModuleType) -> str:
    """Which CUDA build of TensorRT this is ("cu12", "cu13"), or "" when the package does not say.

    ``tensorrt-cu12`` and ``tensorrt-cu13`` of one release report the same ``__version__`` but
    build different engines; the distribution that installed the ``tensorrt`` module names it
    (``tensorrt_cu13_bindings``). A TensorRT from NVIDIA's tar or deb packages gives "".
    """
    top_level = getattr(trt, "__name__", "tensorrt").split(".")[0]
    for distribution in metadata.packages_distributions().get(top_level, []):
        match = re.search(r"cu(\d+)", distribution.lower())
        if match:
            return f"cu{match.group(1)}"
    return ""


def gpu_fingerprint(device_index: int | None = None) -> dict[str, str]:
    """The GPU's name and compute capability: an engine runs only where these match."""
    cuda = _deps.cuda()
    device = cuda.Device(current_device_index() if device_index is None else device_index)
    major, minor = device.compute_capability()
    return {"name": str(device.name()), "compute_capability": f"{major}.{minor}"}


def engine_record(config: BuildConfig) -> dict[str, Any]:
    """What a module file keeps about the engine it holds: how it was built, by which TensorRT, for which GPU.

    Read back by ``saved_engine_problem`` when the file is loaded.
    """
    trt = _deps.tensorrt()
    return {
        "version_compatible": config.version_compatible,
        "hardware_compatibility": config.hardware_compatibility,
        "tensorrt_version": str(trt.__version__),
        "tensorrt_build": tensorrt_build(trt),
        "gpu": gpu_fingerprint(),
    }


def _capability(gpu: dict[str, str]) -> tuple[int, ...]:
    return tuple(int(part) for part in str(gpu.get("compute_capability", "0.0")).split(".")[:2])


def saved_engine_problem(record: dict[str, Any] | None, *, allow_host_code: bool) -> str | None:
    """Why a module file's engine must not be used on this machine, or None when it may be tried.

    TensorRT deserializes an engine built for another GPU model of the same
    compute capability with only a warning, and it may then fail inside
    enqueueV3 ("Cask unknown internal error"); so the GPU and TensorRT recorded
    at build time (``engine_record``) must match this machine's, unless the
    engine was built hardware- or version-compatible. A version-compatible
    engine embeds the lean runtime's native code: it runs only with
    ``allow_host_code``. Files written before the record had these fields are
    checked for what they have.
    """
    record = record or {}
    version_compatible = bool(record.get("version_compatible"))
    if version_compatible and not allow_host_code:
        return (
            "it is version-compatible, so it carries native code (TensorRT's lean runtime) that runs "
            "only when host code is allowed; for a file you trust, load it with allow_host_code=True "
            "(CLI: --allow-host-code)"
        )
    trt = _deps.tensorrt()
    built_by = record.get("tensorrt_version")
    if built_by is not None and not version_compatible:
        here = str(trt.__version__)
        build, build_here = record.get("tensorrt_build", ""), tensorrt_build(trt)
        if built_by != here or (build and build_here and build != build_here):
            return (
                f"it was built by TensorRT {built_by} {build}".rstrip()
                + f", this machine has {here} {build_here}".rstrip()
                + " (an engine runs only on the TensorRT that built it unless built with version_compatible=True)"
            )
    built_on = record.get("gpu")
    if built_on:
        here_gpu = gpu_fingerprint()
        level = record.get("hardware_compatibility", "none")
        if level == "ampere_plus":
            fits, rule = _capability(here_gpu) >= (8, 0), "runs on compute capability 8.0 and newer"
        elif level == "same_compute_capability":
            fits, rule = _capability(here_gpu) == _capability(built_on), "runs on its compute capability only"
        else:
            fits, rule = dict(built_on) == here_gpu, "runs only on the GPU model it was built on"
        if not fits:
            return (
                f"it was built for {built_on.get('name')} (compute capability {built_on.get('compute_capability')}), "
                f"this GPU is {here_gpu['name']} (compute capability {here_gpu['compute_capability']}); "
                f"an engine built with hardware_compatibility={level!r} {rule}"
            )
    return None


FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0, Blackwell 10.x and 12.x


def require_fp8_support(trt: ModuleType, device_index: int | None = None) -> None:
    """Raise a DependencyError unless this TensorRT and GPU can build FP8 (E4M3) Q/DQ.

    FP8 tensor cores start at compute capability 8.9 (Ada; Hopper is 9.0), and
    TensorRT names FP8 in ``DataType.FP8`` where it supports it (feature
    detection, not a version comparison). Checked before the build, because
    TensorRT itself would fail late with a message about tactics.
    """
    if not hasattr(trt.DataType, "FP8"):
        raise DependencyError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no FP8 support (no DataType.FP8); install "
            "TensorRT 10 or newer, or compile with precision='fp16' or precision='int8'"
        )
    gpu = gpu_fingerprint(device_index)
    major, minor = (int(part) for part in gpu["compute_capability"].split(".")[:2])
    if (major, minor) < FP8_MIN_COMPUTE_CAPABILITY:
        raise DependencyError(
            f"precision='fp8' needs a GPU of compute capability {'.'.join(map(str, FP8_MIN_COMPUTE_CAPABILITY))} "
            f"or newer (Ada, Hopper, Blackwell), but {gpu['name']} has compute capability {major}.{minor}; "
            "compile with precision='fp16' or precision='int8' for this GPU, or build this FP8 graph on an "
            "FP8 GPU (export_onnx writes the trtexec line)"
        )


# Weight-only precisions: TensorRT's INT4 weight-only GEMMs run on Ampere and newer; NVFP4 on Blackwell.
WEIGHT_ONLY_MIN_COMPUTE_CAPABILITY = {"int4": (8, 0), "nvfp4": (10, 0)}


def require_weight_only_support(fmt: str, device_index: int | None = None) -> None:
    """Raise a DependencyError unless this GPU runs ``fmt`` ("int4" or "nvfp4") weights.

    Checked before the build, as for FP8: TensorRT itself fails late, naming a tactic.
    """
    needed = WEIGHT_ONLY_MIN_COMPUTE_CAPABILITY[fmt]
    gpu = gpu_fingerprint(device_index)
    major, minor = (int(part) for part in gpu["compute_capability"].split(".")[:2])
    if (major, minor) < needed:
        family = "Blackwell" if fmt == "nvfp4" else "Ampere or newer"
        others = "'int4', 'int8' or 'fp16'" if fmt == "nvfp4" and (major, minor) >= (8, 0) else "'int8' or 'fp16'"
        raise DependencyError(
            f"precision={fmt!r} needs a GPU of compute capability {'.'.join(map(str, needed))} or newer "
            f"({family}), but {gpu['name']} has compute capability {major}.{minor}; compile with precision "
            f"{others} for this GPU, or build this graph on such a GPU (export_onnx writes the trtexec line)"
        )


# ------------------------------------------------------------------------ build
def build_engine(
    onnx_model: onnx.ModelProto,
    profiles: Sequence[ShapeProfile],
    config: BuildConfig,
    *,
    accept_cached: Callable[[bytes], bool] | None = None,
) -> bytes:
    """Build (or fetch from ``config.engine_cache_dir``) a serialized engine for ``onnx_model``.

    The model is written to a temporary directory and parsed from the file, so
    models with external weights (over protobuf's 2 GB) work too. A cached
    engine that ``accept_cached`` refuses (the caller could not deserialize it)
    is a miss: the entry is deleted, with one warning, and the engine rebuilt.
    """
    # The ONNX parser's Q/DQ rules, checked here with messages that name the node and the fix.
    validate_qdq(onnx_model)
    trt = _deps.tensorrt()
    weight_only = carried_precision(onnx_model)
    if weight_only in WEIGHT_ONLY_MIN_COMPUTE_CAPABILITY:
        require_weight_only_support(weight_only)
    elif graph_format(onnx_model) is FP8:
        require_fp8_support(trt)
    cache = EngineCache.from_config(config)
    with tempfile.TemporaryDirectory(prefix="trtopt-build-") as workdir:
        model_path = save_model(onnx_model, Path(workdir) / "model.onnx")
        fields = None
        if cache is not None:
            fields = engine_key_fields(
                files_digest(sorted(Path(workdir).iterdir())),
                profiles,
                config,
                str(trt.__version__),
                gpu_fingerprint(),
                tensorrt_build=tensorrt_build(trt),
                builder_settings=BUILDER_SETTINGS_VERSION,
            )
            cached = cache.get(fields)
            if cached is not None:
                if accept_cached is None or accept_cached(cached):
                    return cached
                cache.discard(fields, f"TensorRT {trt.__version__} cannot deserialize it")
        start = time.perf_counter()
        engine = build_from_file(trt, model_path, profiles, config)
        logger.info(
            "built TensorRT %s engine: %.1f MB in %.1f s",
            trt.__version__,
            len(engine) / 1e6,
            time.perf_counter() - start,
        )
    if cache is not None and fields is not None:
        cache.put(fields, engine)
    return engine


def build_from_file(
    trt: ModuleType, model_path: Path, profiles: Sequence[ShapeProfile], config: BuildConfig
) -> bytes:
    """Parse ``model_path`` into a strongly typed network and build it with ``config``'s settings."""
    builder, errors = _deps.create_builder(trt)
    bridge = tensorrt_logger(trt)
    if builder is None:
        raise BuildError(
            "TensorRT could not create a builder (is the CUDA device usable?). " + format_errors(errors)
        )
    # STRONGLY_TYPED is required on 10.x and the only behaviour on 11.x (docs/gpu.md).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, bridge)
    parse_onnx_file(parser, model_path)

    builder_config = builder.create_builder_config()
    configure(trt, builder_config, config)
    add_profiles(builder, network, builder_config, profiles, bridge)
    timing_cache_path = Path(config.timing_cache).expanduser() if config.timing_cache else None
    if timing_cache_path is not None:
        attach_timing_cache(builder_config, timing_cache_path)

    monitor = None  # held here: TensorRT keeps only a raw pointer to it during the build
    if hasattr(trt, "IProgressMonitor"):
        monitor = make_progress_monitor(trt)
        builder_config.progress_monitor = monitor
        progress: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    else:
        progress = heartbeat()
    with bridge.errors.capture() as errors, progress:
        serialized = builder.build_serialized_network(network, builder_config)
    del monitor
    if serialized is None:
        raise BuildError(
            "TensorRT could not build the engine. "
            + format_errors(errors, bridge.errors.recent)
            + "\nCheck that every operator is supported by this TensorRT version and that the "
            "shape ranges are valid; a larger workspace_bytes helps when tactics ran out of memory."
        )
    if timing_cache_path is not None:
        try:
            save_timing_cache(builder_config, timing_cache_path)
        except OSError as exc:  # the engine is built: losing the cache only costs build time later
            logger.warning("timing cache: could not save %s (%s); the engine is kept", timing_cache_path, exc)
    return bytes(serialized)


def parse_onnx_file(parser: Any, model_path: Path) -> None:
    """Parse the model; on failure raise a BuildError listing every parser error."""
    if parser.parse_from_file(str(model_path)):
        return
    lines = []
    for index in range(parser.num_errors):
        parser_error = parser.get_error(index)
        node = parser_error.node_name() or f"#{parser_error.node()}"
        operator = parser_error.node_operator() or "?"
        lines.append(f"node {node} ({operator}): {parser_error.desc()}")
    raise BuildError(
        f"TensorRT's ONNX parser rejected the model ({len(lines)} error(s)):\n  "
        + "\n  ".join(lines or ["(the parser reported no details)"])
        + "\nAn operator TensorRT does not support must be replaced in the model or kept out of "
        "the exported graph; an opset issue may go away with a different BuildConfig.opset."
    )


def configure(trt: ModuleType, builder_config: Any, config: BuildConfig) -> None:
    """Apply the engine settings of ``config`` (never a precision flag: the graph is typed)."""
    if config.workspace_bytes is not None:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_bytes))
    builder_config.builder_optimization_level = int(config.optimization_level)
    # Layer names and tactics in the engine inspector's JSON and for profile_layers. DETAILED also
    # makes NVTX ranges detailed, which TensorRT says generally increases enqueue latency, so the
    # runtime lowers each execution context's nvtx_verbosity unless it is profiling.
    builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    # TensorRT sets TF32 by default; cleared unless asked for, so FP32 means FP32 (Polygraphy does the same).
    if config.tf32:
        builder_config.set_flag(trt.BuilderFlag.TF32)
    else:
        builder_config.clear_flag(trt.BuilderFlag.TF32)
    if config.version_compatible:
        builder_config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if config.hardware_compatibility == "ampere_plus":
        builder_config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    elif config.hardware_compatibility == "same_compute_capability":
        # Added during 10.x (absent from 10.0): detect it rather than compare version strings.
        if not hasattr(trt.HardwareCompatibilityLevel, "SAME_COMPUTE_CAPABILITY"):
            raise BuildError(
                f"hardware_compatibility='same_compute_capability' needs a newer TensorRT than "
                f"{trt.__version__}; upgrade TensorRT or use 'ampere_plus'"
            )
        builder_config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY


def _check_range(index: int, name: str, network_shape: tuple[int, ...], span: InputRange) -> None:
    if len(network_shape) != len(span.min):
        raise BuildError(
            f"optimization profile {index}: input {name!r} has rank {len(network_shape)} in the "
            f"network {list(network_shape)} but the profile gives rank {len(span.min)} "
            f"{span.describe()}; give a range of the network's rank"
        )
    for d, dim in enumerate(network_shape):
        if dim >= 0 and not span.min[d] == span.opt[d] == span.max[d] == dim:
            raise BuildError(
                f"optimization profile {index}: input {name!r} dimension {d} is fixed at {dim} in "
                f"the network but the profile gives {span.min[d]}..{span.max[d]}; "
                "remove that dimension from dynamic_shapes"
            )


def _set_shape(trt_profile: Any, index: int, name: str, span: InputRange) -> None:
    """``set_shape``, whose bindings raise RuntimeError on an inconsistent range, as a BuildError."""
    try:
        trt_profile.set_shape(name, span.min, span.opt, span.max)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise BuildError(
            f"TensorRT rejected the range of input {name!r} in optimization profile {index} "
            f"{span.describe()}: {first_line(exc)}; each dimension needs 0 <= min <= opt <= max"
        ) from exc


def add_profiles(
    builder: Any,
    network: Any,
    builder_config: Any,
    profiles: Sequence[ShapeProfile],
    bridge: Any,
) -> list[int]:
    """Add one optimization profile per ShapeProfile, each checked against the network's inputs.

    A network without dynamic inputs needs no profile and gets none. Returns
    the profile indices TensorRT assigned (0, 1, ... in order).
    """
    network_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    # Checked before the static case returns: a shape-tensor input needs a profile of its *values*
    # even when its own dimensions are fixed, and trtopt's profiles cover only execution tensors.
    for network_input in network_inputs:
        if network_input.is_shape_tensor:
            raise BuildError(
                f"network input {network_input.name!r} is a shape tensor; trtopt's profiles cover "
                "only execution tensors. Pass that value as a constant (a Python int) instead."
            )
    shapes = {network_input.name: tuple(network_input.shape) for network_input in network_inputs}
    if not any(d < 0 for shape in shapes.values() for d in shape):
        return []
    indices = []
    for index, shape_profile in enumerate(profiles):
        given = [r.name for r in shape_profile.inputs]
        missing = [n for n in shapes if n not in given]
        unknown = [n for n in given if n not in shapes]
        if missing or unknown:
            raise BuildError(
                f"optimization profile {index} does not match the network's inputs {list(shapes)}: "
                + (f"no range for {missing}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"ranges for unknown input(s) {unknown}" if unknown else "")
                + "; the profiles must name exactly the model's inputs"
            )
        trt_profile = builder.create_optimization_profile()
        for name, shape in shapes.items():
            span = shape_profile[name]
            _check_range(index, name, shape, span)
            _set_shape(trt_profile, index, name, span)
        with bridge.errors.capture() as errors:
            assigned = builder_config.add_optimization_profile(trt_profile)
        if assigned < 0:
            ranges = ", ".join(f"{r.name} {r.describe()}" for r in shape_profile.inputs)
            raise BuildError(
                f"TensorRT rejected optimization profile {index} ({ranges}); each range needs "
                "1 <= min <= opt <= max. " + format_errors(errors)
            )
        indices.append(assigned)
    return indices


# ----------------------------------------------------------------- timing cache
def attach_timing_cache(builder_config: Any, path: Path) -> Any:
    """Load the timing cache at ``path`` (or start an empty one) and attach it to the build.

    A cache from another GPU or TensorRT version, or an unreadable file, is
    replaced by an empty cache with a warning: it only costs build time.
    """
    data = b""
    if path.is_file():
        data = path.read_bytes()
    timing_cache = None
    if data:
        try:
            timing_cache = builder_config.create_timing_cache(data)
            if timing_cache is not None and not builder_config.set_timing_cache(timing_cache, False):
                timing_cache = None
        except Exception as exc:  # noqa: BLE001 - bindings raise various types for corrupt data
            logger.debug("timing cache %s rejected: %s", path, exc)
            timing_cache = None
        if timing_cache is None:
            logger.warning(
                "timing cache %s is corrupt or from another GPU/TensorRT; starting a new one", path
            )
        else:
            logger.info("timing cache: loaded %s (%d bytes)", path, len(data))
    if timing_cache is None:
        timing_cache = builder_config.create_timing_cache(b"")
        builder_config.set_timing_cache(timing_cache, False)
    return timing_cache


def save_timing_cache(builder_config: Any, path: Path) -> None:
    """Merge the build's timing cache into the file's latest contents and write it atomically.

    Under an exclusive lock on ``<path>.lock``, so concurrent builds (threads or
    processes) sharing one cache keep each other's entries instead of the last
    writer dropping them (Polygraphy's timing-cache save does the same).
    """
    timing_cache = builder_config.get_timing_cache()
    if timing_cache is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        _combine_with_file(builder_config, timing_cache, path)
        data = bytes(timing_cache.serialize())
        atomic_write(path, data)
    logger.info("timing cache: saved %s (%d bytes)", path, len(data))


def _combine_with_file(builder_config: Any, timing_cache: Any, path: Path) -> None:
    """Add the entries another build saved to ``path`` since this one loaded it; a bad file is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if not data:
        return
    try:
        on_disk = builder_config.create_timing_cache(data)
        merged = on_disk is not None and timing_cache.combine(on_disk, False)
    except Exception as exc:  # noqa: BLE001 - bindings raise various types for corrupt data
        logger.debug("timing cache %s not merged: %s", path, exc)
        merged = False
    if not merged:
        logger.debug("timing cache %s is from another GPU/TensorRT or corrupt; replacing it", path)


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive lock between threads (a lock per path) and processes (``flock`` where available)."""
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(str(lock_path), threading.Lock())
    with thread_lock, open(lock_path, "a+b") as handle:
        if sys.platform != "win32":  # no flock on Windows: threads of this process are still serialised
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if sys.platform != "win32":
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
