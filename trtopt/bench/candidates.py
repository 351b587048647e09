"""The rows a benchmark measures: the eager torch baseline and trtopt modules, built, checked for accuracy and timed side by side."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError, DependencyError, TrtoptError
from ..graph import prune_weights_dir
from .compare import compare_outputs, run_in_chunks
from .results import BenchResult, device_name
from .timing import measure_side_by_side
from ..compiler import compile as trtopt_compile, select_backend
from ..module import CompiledModule
from ..backends.onnxruntime import OnnxRuntimeBackend

if TYPE_CHECKING:
    from ..calibrators.data import CalibrationData

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One row to measure: its result (filled in as measured) and the callable to time.

    ``fn`` is None when the row could not be built (``result.status`` says why).
    """

    result: BenchResult
    fn: Callable[..., Any] | None


def torch_candidate(name: str, model: torch.nn.Module) -> Candidate:
    """The eager baseline: the torch model as is, under ``torch.inference_mode``."""
    model = model.eval()

    def call(*inputs: torch.Tensor) -> Any:
        with torch.inference_mode():
            return model(*inputs)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    result = BenchResult(
        model=name,
        runtime="torch-eager",
        precision="fp32",
        backend="torch",
        device="cpu" if device.type == "cpu" else device_name(),
    )
    return Candidate(result, call)


def torch_reference(model: torch.nn.Module, inputs: Sequence[torch.Tensor], chunk: int) -> list[np.ndarray]:
    """FP32 torch outputs on the evaluation inputs: what every precision is compared with."""
    with torch.inference_mode():
        return run_in_chunks(model.eval(), inputs, chunk)


def compiled_candidate(
    name: str,
    module: Any,
    *,
    artifact_bytes: int | None = None,
    compile_time_s: float | None = None,
) -> Candidate:
    """An already compiled ``CompiledModule`` (e.g. loaded from a ``.trtopt`` file)."""
    on_gpu = module.backend_name == "tensorrt"
    result = BenchResult(
        model=name,
        runtime="trtopt",
        precision=module.precision,
        backend=module.backend_name,
        device=device_name() if on_gpu else "cpu",
        compile_time_s=compile_time_s,
        artifact_bytes=artifact_bytes,
    )
    return Candidate(result, module)


def trtopt_candidate(
    name: str,
    model: Any,
    example_inputs: Sequence[torch.Tensor],
    *,
    precision: str,
    backend: str = "auto",
    dynamic_shapes: Any = None,
    calibration_data: CalibrationData | None = None,
    eval_inputs: Sequence[torch.Tensor] | None = None,
    reference: Sequence[np.ndarray] | None = None,
    eval_chunk: int = 1,
    classifier: bool | None = None,
    **overrides: Any,
) -> Candidate:
    """Compile ``model`` at ``precision``; record compile time, artifact size and accuracy.

    Accuracy is measured against ``reference`` (see ``torch_reference``) on
    ``eval_inputs``, ``eval_chunk`` samples per call. A precision or backend
    that cannot run here (a ``ConfigError`` such as "not available", or a
    ``DependencyError`` such as no TensorRT) gives a row with
    ``status="skipped"`` and the reason; any other trtopt error gives
    ``status="failed"``. Bugs (non-trtopt exceptions) propagate.
    """
    row: dict[str, Any] = dict(model=name, runtime="trtopt", precision=precision, backend=str(backend), device="–")
    start = time.perf_counter()
    try:
        row["backend"] = select_backend(backend).value
        module = trtopt_compile(
            model,
            tuple(example_inputs),
            precision=precision,
            backend=backend,
            dynamic_shapes=dynamic_shapes,
            calibration_data=calibration_data,
            **overrides,
        )
    except (ConfigError, DependencyError) as exc:
        logger.warning("%s %s: skipped: %s", name, precision, exc)
        return Candidate(BenchResult(**row, status="skipped", reason=str(exc)), None)
    except TrtoptError as exc:
        logger.warning("%s %s: failed: %s", name, precision, exc)
        return Candidate(BenchResult(**row, status="failed", reason=f"{type(exc).__name__}: {exc}"), None)
    compile_time = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="trtopt-bench-") as tmp:
        artifact = module.save(Path(tmp) / f"{name}.trtopt").stat().st_size
    candidate = compiled_candidate(name, module, artifact_bytes=artifact, compile_time_s=compile_time)
    if eval_inputs is not None and reference is not None:
        candidate.result.accuracy = compare_outputs(
            reference, run_in_chunks(module, eval_inputs, eval_chunk), classifier=classifier
        )
    return candidate


def run_side_by_side(
    candidates: Sequence[Candidate],
    make_inputs: Callable[[int], Sequence[Any]],
    batch_sizes: Sequence[int],
    *,
    warmup: int,
    iterations: int,
    threads: int | None = None,
) -> list[BenchResult]:
    """Time every runnable candidate side by side (``measure_side_by_side``); return all results.

    Every candidate runs with the same number of intra-op CPU threads, ``threads``
    (default: torch's current count): torch through ``torch.set_num_threads`` for the
    run, trtopt modules on ONNX Runtime through a session with that many
    ``intra_op_num_threads``. Otherwise eager torch may use every core while ONNX
    Runtime uses its own count, and on a busy machine the side with more threads
    than free cores stalls (speedups of several hundred times were seen). Rows
    whose calls varied widely (``LatencyStats.unstable``) get a warning.
    """
    threads = threads or torch.get_num_threads()
    if threads < 1:
        raise ConfigError(f"threads={threads}; use a positive count (default: torch.get_num_threads())")
    runnable = [c for c in candidates if c.fn is not None]
    for candidate in runnable:
        _pin_threads(candidate, threads)
    _warn_if_busy(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stats, memory = measure_side_by_side(
            [c.fn for c in runnable if c.fn is not None], make_inputs, batch_sizes, warmup=warmup, iterations=iterations
        )
    finally:
        torch.set_num_threads(previous)
    for candidate, latency, peak in zip(runnable, stats, memory):
        candidate.result.latency = latency
        candidate.result.memory = peak
        for s in latency:
            if s.unstable:
                r = candidate.result
                logger.warning(
                    "unstable timings: %s %s %s at batch %d: p90 %.2f ms is %.1fx the median %.2f ms; the machine "
                    "may be busy: compare rows of one run only, or rerun with more iterations",
                    r.model, r.runtime, r.precision, s.batch_size, s.p90_ms, s.spread, s.p50_ms,
                )
    return [c.result for c in candidates]


def _warn_if_busy(threads: int) -> None:
    """A call on several threads waits at each parallel region for its slowest thread; on a machine
    with more runnable processes than cores that thread is often descheduled, and a many-small-ops
    model (eager torch) loses far more than a few fused kernels do: the ratios stop meaning anything."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return
    cores = os.cpu_count() or 1
    if threads > 1 and load > cores:
        logger.warning(
            "the machine is busy (load average %.1f on %d cores): timings with %d threads wait on descheduled "
            "threads, eager torch far more than ONNX Runtime; time with threads=1 (trtopt bench --threads 1) "
            "for ratios that hold", load, cores, threads,
        )


def _pin_threads(candidate: Candidate, threads: int) -> None:
    """Record ``threads`` on a CPU row; give a trtopt module on ONNX Runtime a session with that many."""
    result = candidate.result
    module = candidate.fn
    if isinstance(module, CompiledModule) and module.backend_name == "onnxruntime":
        # The same session otherwise: an INT4 module keeps running on MatMulNBits at its accuracy level.
        level = getattr(module.backend, "int4_accuracy_level", None)
        module.backend = OnnxRuntimeBackend(module.onnx_model, intra_op_threads=threads, emulate_fp16=True,
                                            int4_accuracy_level=level)
        prune_weights_dir(module.onnx_model)  # the replaced session's weight files, where they are on disk
        result.threads = threads
    elif result.runtime == "torch-eager" and result.device == "cpu":
        result.threads = threads
