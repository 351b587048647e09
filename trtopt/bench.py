"""Measurement harness shared by ``benchmarks/``, ``notebooks/`` and ``trtopt bench``.

One place decides how trtopt is measured, so that a number in the README, in a
notebook and on the command line means the same thing:

- **Clock.** GPU work is asynchronous: the host returns from a call before the
  kernels finish, so a host clock measures launch time. When the warm-up
  produced CUDA tensors, each run is timed with a pair of ``torch.cuda.Event``
  recorded on the current stream (the callable must enqueue on that stream or
  synchronise before returning, as trtopt's runtime does). On the CPU,
  ``time.perf_counter`` (monotonic, highest resolution) times each call.
- **Warm-up.** At least one untimed call: it pays one-off costs (allocator,
  kernel selection, lazy initialisation) and its outputs pick the clock.
- **Percentiles.** ``numpy.percentile`` with ``method="linear"`` (numpy's
  default; Hyndman and Fan's type 7): the p-th percentile of n sorted samples
  ``x[0..n-1]`` lies at rank ``(n - 1) * p / 100``, interpolated linearly
  between the two neighbouring samples. With few samples p99 is close to the
  maximum; report the iteration count with it (``LatencyStats.iterations``).
- **Throughput.** ``batch_size / p50``: samples per second at the median
  latency of one call (no overlapping of calls).
- **Accuracy.** Against the FP32 torch model on the same inputs: max and mean
  absolute error over every output element, cosine similarity of all outputs
  flattened into one vector, and for classifiers (first output ``[N, C]``,
  ``C > 1``) the fraction of samples whose arg-max class agrees.
- **Side by side.** Variants of one model are timed in alternating blocks
  (a few rounds, one block of calls of each per round), so load from other
  processes falls on all of them alike and their ratios stay fair on a
  shared machine (``measure_side_by_side``).
- **Peak memory.** Resident set size (RSS) of this process during a variant's
  warm-up calls (the same work as the timed calls, which alternate with other
  variants' and cannot be told apart). On Linux the kernel's peak (``VmHWM``)
  is reset through ``/proc/self/clear_refs`` first, so the peak is that of
  the measured window (``rss_scope="window"``); elsewhere it is the process's lifetime peak from
  ``resource.getrusage`` (``rss_scope="process"``). RSS counts everything the
  process holds, including the torch model it was compiled from, so the
  growth above the level at the window's start (``MemoryUsage.growth_bytes``)
  is also kept: the memory the calls themselves needed. On a GPU,
  ``torch.cuda.max_memory_allocated`` adds the peak of torch's allocator
  (memory TensorRT allocates outside torch is not in it).

Results are dataclasses; ``BenchReport.to_json`` carries ``schema`` and
``schema_version`` so that readers can refuse files they do not understand.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import atomic_path, atomic_write
from ._version import __version__
from .errors import ConfigError, DependencyError, InputError, TrtoptError

logger = logging.getLogger(__name__)

SCHEMA = "trtopt-bench"
SCHEMA_VERSION = 1
PERCENTILE_METHOD = "linear"  # numpy's default, Hyndman-Fan type 7

# --------------------------------------------------------------------- statistics


def percentiles(samples: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> list[float]:
    """The ``qs`` percentiles of ``samples`` by linear interpolation (see the module docstring)."""
    data = np.asarray(samples, dtype=np.float64)
    if data.size == 0:
        raise InputError("cannot take percentiles of no samples; run at least one iteration")
    return [float(v) for v in np.percentile(data, qs, method=PERCENTILE_METHOD)]


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one call at one batch size, in milliseconds."""

    batch_size: int
    iterations: int
    clock: str  # "cuda-event" or "perf_counter"
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    throughput_per_s: float  # samples per second at the median latency

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], batch_size: int, clock: str) -> LatencyStats:
        data = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = percentiles(data)
        return cls(
            batch_size=batch_size,
            iterations=int(data.size),
            clock=clock,
            mean_ms=float(data.mean()),
            std_ms=float(data.std()),
            min_ms=float(data.min()),
            p50_ms=p50,
            p90_ms=p90,
            p99_ms=p99,
            max_ms=float(data.max()),
            throughput_per_s=batch_size * 1000.0 / p50 if p50 > 0 else math.inf,
        )


# ---------------------------------------------------------------------- outputs


def output_leaves(obj: Any) -> list[np.ndarray]:
    """Flatten a model's (nested) outputs into float64 numpy arrays, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().to("cpu", torch.float64).numpy()]
    if isinstance(obj, np.ndarray):
        return [obj.astype(np.float64)]
    if isinstance(obj, Mapping):
        return [leaf for value in obj.values() for leaf in output_leaves(value)]
    if isinstance(obj, (tuple, list)):
        return [leaf for value in obj for leaf in output_leaves(value)]
    raise InputError(f"cannot compare an output of type {type(obj).__name__}; expected tensors")


def is_cuda(obj: Any) -> bool:
    """True when any tensor in a (nested) input or output lives on a CUDA device."""
    if isinstance(obj, torch.Tensor):
        return obj.is_cuda
    if isinstance(obj, Mapping):
        return any(is_cuda(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return any(is_cuda(v) for v in obj)
    return False


@dataclass(frozen=True)
class Accuracy:
    """How far a candidate's outputs are from the FP32 reference's on the same inputs."""

    samples: int
    max_abs_error: float
    mean_abs_error: float
    cosine_similarity: float
    top1_agreement: float | None  # None when the model is not a classifier


def compare_outputs(reference: Any, candidate: Any, *, classifier: bool | None = None) -> Accuracy:
    """Compare two (nested) outputs; ``classifier=None`` decides from the first output's shape."""
    ref, cand = output_leaves(reference), output_leaves(candidate)
    if len(ref) != len(cand):
        raise InputError(f"the reference has {len(ref)} outputs but the candidate has {len(cand)}")
    for i, (r, c) in enumerate(zip(ref, cand)):
        if r.shape != c.shape:
            raise InputError(f"output {i} has shape {c.shape} but the reference has {r.shape}")
    r_all = np.concatenate([r.ravel() for r in ref])
    c_all = np.concatenate([c.ravel() for c in cand])
    if r_all.size == 0:
        raise InputError("the outputs are empty; nothing to compare")
    diff = np.abs(r_all - c_all)
    norm = float(np.linalg.norm(r_all) * np.linalg.norm(c_all))
    cosine = float(np.dot(r_all, c_all) / norm) if norm > 0 else float(np.array_equal(r_all, c_all))
    first_ref, first_cand = ref[0], cand[0]
    if classifier is None:
        classifier = first_ref.ndim == 2 and first_ref.shape[1] > 1
    top1 = None
    if classifier:
        if first_ref.ndim != 2:
            raise InputError(
                f"top-1 agreement needs a first output of shape [N, classes], got {first_ref.shape}"
            )
        top1 = float(np.mean(first_ref.argmax(axis=1) == first_cand.argmax(axis=1)))
    return Accuracy(
        samples=int(first_ref.shape[0]) if first_ref.ndim else 1,
        max_abs_error=float(diff.max()),
        mean_abs_error=float(diff.mean()),
        cosine_similarity=cosine,
        top1_agreement=top1,
    )


# ----------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryUsage:
    peak_rss_bytes: int | None
    rss_scope: str  # "window": peak of the measured window; "process": since the process started
    start_rss_bytes: int | None = None  # RSS when the window opened ("window" scope only)
    peak_cuda_bytes: int | None = None  # torch's allocator only

    @property
    def growth_bytes(self) -> int | None:
        """How far RSS rose above its level at the start of the window: what the calls needed."""
        if self.peak_rss_bytes is None or self.start_rss_bytes is None:
            return None
        return self.peak_rss_bytes - self.start_rss_bytes


def _read_status(field_name: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return None


class PeakMemory:
    """Context manager that records peak memory inside its ``with`` block (see module docstring)."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda and torch.cuda.is_available()
        self.usage: MemoryUsage | None = None
        self._scope = "process"
        self._start: int | None = None

    def __enter__(self) -> PeakMemory:
        try:
            # Writing "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self._scope = "window"
            self._start = _read_status("VmRSS")
        except OSError:
            self._scope = "process"
            self._start = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        rss = _read_status("VmHWM") if self._scope == "window" else None
        if rss is None:
            self._scope, self._start = "process", None
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss = maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, kB on Linux
        cuda_peak = int(torch.cuda.max_memory_allocated()) if self.cuda else None
        self.usage = MemoryUsage(
            peak_rss_bytes=int(rss), rss_scope=self._scope, start_rss_bytes=self._start, peak_cuda_bytes=cuda_peak
        )


# ----------------------------------------------------------------------- timing


def _timer(fn: Callable[[], Any], on_cuda: bool) -> tuple[Callable[[], float], str]:
    """A function that calls ``fn`` once and returns its latency in ms, and the clock's name."""
    if on_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed() -> float:
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

        return timed, "cuda-event"

    def timed_cpu() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0

    return timed_cpu, "perf_counter"


def measure_side_by_side(
    fns: Sequence[Callable[..., Any]],
    make_inputs: Callable[[int], Sequence[Any]],
    batch_sizes: Iterable[int],
    *,
    warmup: int,
    iterations: int,
    rounds: int = 5,
) -> tuple[list[list[LatencyStats]], list[MemoryUsage | None]]:
    """Latency of each ``fn(*make_inputs(b))`` at each batch size, measured in alternating blocks.

    All callables get the same inputs. After each one's warm-up, the timed
    calls are split into ``rounds`` blocks; each round runs one block of every
    callable (the starting callable rotating). Load from other processes and
    clock drift then fall on every callable alike, so the ratios between them
    stay fair on a busy machine. Each block starts with one untimed call: the
    previous callable's thread pool (ONNX Runtime and OpenMP threads spin for
    a while after their work) may still hold a core, and caches are cold.
    Peak memory is taken per callable around its warm-up calls; the batch
    size whose calls grew RSS most is kept. Returns ``(stats, memory)``, one
    entry per callable.
    """
    if warmup < 1:
        raise ConfigError(
            f"warmup={warmup}; use at least 1: the first call pays one-off costs and picks the clock"
        )
    if iterations < 1:
        raise ConfigError(f"iterations={iterations}; use at least 1 (20 or more for a stable p99)")
    if rounds < 1:
        raise ConfigError(f"rounds={rounds}; use at least 1")
    rounds = min(rounds, iterations)
    blocks = [iterations // rounds + (1 if r < iterations % rounds else 0) for r in range(rounds)]
    stats: list[list[LatencyStats]] = [[] for _ in fns]
    memory: list[MemoryUsage | None] = [None for _ in fns]
    for batch in batch_sizes:
        inputs = tuple(make_inputs(batch))
        calls = [functools.partial(fn, *inputs) for fn in fns]
        timers = []
        for index, call in enumerate(calls):
            with PeakMemory(cuda=is_cuda(inputs)) as peak:
                for _ in range(warmup):
                    out = call()
            on_cuda = is_cuda(out)
            if on_cuda:
                torch.cuda.synchronize()
            timers.append(_timer(call, on_cuda))
            memory[index] = _larger(memory[index], peak.usage)
        samples: list[list[float]] = [[] for _ in fns]
        for round_, block in enumerate(blocks):
            for k in range(len(fns)):
                index = (round_ + k) % len(fns)
                calls[index]()  # settle: see the docstring
                samples[index] += [timers[index][0]() for _ in range(block)]
        for index, (_, clock) in enumerate(timers):
            stats[index].append(LatencyStats.from_samples(samples[index], batch, clock))
        logger.debug("batch %d: p50 %s ms", batch, ", ".join(f"{s[-1].p50_ms:.2f}" for s in stats))
    return stats, memory


def _larger(a: MemoryUsage | None, b: MemoryUsage | None) -> MemoryUsage | None:
    """The window with the larger growth (else the larger peak): the most demanding batch size."""
    if a is None or b is None:
        return b or a
    key = (lambda m: m.growth_bytes) if a.growth_bytes is not None and b.growth_bytes is not None else (
        lambda m: m.peak_rss_bytes or 0
    )
    return a if key(a) >= key(b) else b


def measure_latency(
    fn: Callable[..., Any],
    make_inputs: Callable[[int], Sequence[Any]],
    batch_sizes: Iterable[int],
    *,
    warmup: int,
    iterations: int,
) -> list[LatencyStats]:
    """Latency statistics of ``fn(*make_inputs(b))`` for each batch size ``b`` (one callable)."""
    stats, _ = measure_side_by_side([fn], make_inputs, batch_sizes, warmup=warmup, iterations=iterations)
    return stats[0]


def run_in_chunks(fn: Callable[..., Any], inputs: Sequence[torch.Tensor], chunk: int) -> list[np.ndarray]:
    """Run ``fn`` over ``inputs`` ``chunk`` samples at a time (dim 0); return concatenated leaves.

    Used for accuracy: the evaluation set may be larger than the compiled batch range.
    """
    total = int(inputs[0].shape[0])
    parts: list[list[np.ndarray]] = []
    for start in range(0, total, chunk):
        parts.append(output_leaves(fn(*(t[start : start + chunk] for t in inputs))))
    return [np.concatenate(leaf) for leaf in zip(*parts)]


# ---------------------------------------------------------------------- results


@dataclass
class BenchResult:
    """One row: a model run one way (torch eager, or trtopt at one precision on one backend)."""

    model: str
    runtime: str  # "torch-eager" or "trtopt"
    precision: str
    backend: str  # "torch", "onnxruntime" or "tensorrt"
    device: str
    status: str = "ok"  # "ok", "skipped" (cannot run here / not available) or "failed"
    reason: str | None = None
    compile_time_s: float | None = None
    artifact_bytes: int | None = None  # size of the saved .trtopt file
    memory: MemoryUsage | None = None
    latency: list[LatencyStats] = field(default_factory=list)
    accuracy: Accuracy | None = None

    def latency_at(self, batch_size: int) -> LatencyStats | None:
        return next((s for s in self.latency if s.batch_size == batch_size), None)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchResult:
        values = dict(data)
        values["memory"] = MemoryUsage(**values["memory"]) if values.get("memory") else None
        values["latency"] = [LatencyStats(**s) for s in values.get("latency", [])]
        values["accuracy"] = Accuracy(**values["accuracy"]) if values.get("accuracy") else None
        return cls(**values)


def device_name() -> str:
    """A readable name for where torch runs work by default here."""
    if torch.cuda.is_available():
        return f"cuda:0 ({torch.cuda.get_device_name(0)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment() -> dict[str, Any]:
    """Versions and hardware, so that a result file says where it was measured."""
    import onnxruntime

    return {
        "trtopt": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "cpu_count": os.cpu_count(),
        "device": device_name(),
    }


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


@dataclass
class BenchReport:
    """A benchmark run: settings, environment and one ``BenchResult`` per row."""

    results: list[BenchResult]
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=environment)
    created_utc: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )

    def to_json(self) -> dict[str, Any]:
        return _finite(
            {
                "schema": SCHEMA,
                "schema_version": SCHEMA_VERSION,
                "percentile_method": PERCENTILE_METHOD,
                **dataclasses.asdict(self),
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchReport:
        if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(
                f"not a {SCHEMA} v{SCHEMA_VERSION} result (schema {data.get('schema')!r} "
                f"v{data.get('schema_version')!r}); rerun the benchmark with this trtopt"
            )
        return cls(
            results=[BenchResult.from_json(r) for r in data["results"]],
            settings=dict(data.get("settings", {})),
            environment=dict(data.get("environment", {})),
            created_utc=data.get("created_utc", ""),
        )

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write(path, json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")

    def markdown(self) -> str:
        return markdown_table(self)


# --------------------------------------------------------------------- tables


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _memory_cell(memory: MemoryUsage | None) -> str:
    if memory is None or memory.peak_rss_bytes is None:
        return "–"
    text = f"{memory.peak_rss_bytes / 1e6:.0f}"
    if memory.growth_bytes is not None:
        text += f" (+{memory.growth_bytes / 1e6:.0f})"
    if memory.peak_cuda_bytes is not None:
        text += f"; CUDA {memory.peak_cuda_bytes / 1e6:.0f}"
    return text


def markdown_table(report: BenchReport) -> str:
    """One row per result; per batch size p50 / p99 latency, throughput and speedup over eager.

    Speedup is the torch-eager p50 divided by this row's p50 at the same batch
    size, both measured in the same run.
    """
    batches = sorted({s.batch_size for r in report.results for s in r.latency})
    head = ["Model", "Runtime", "Precision", "Backend"]
    for b in batches:
        head += [f"b{b} p50 / p99 ms", f"b{b} samples/s", f"b{b} speedup"]
    head += ["Top-1 agree", "Max abs err", "Cosine", "Compile s", "Size MB", "Peak RSS MB (+calls)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    eager = {r.model: r for r in report.results if r.runtime == "torch-eager" and r.status == "ok"}
    notes = []
    for r in report.results:
        row = [r.model, r.runtime, r.precision, r.backend]
        if r.status != "ok":
            notes.append(f"{r.model} {r.runtime} {r.precision} ({r.backend}): {r.status}: {r.reason}")
            row += [f"{r.status} [{len(notes)}]"] + ["–"] * (3 * len(batches) + 5)
            lines.append("| " + " | ".join(row) + " |")
            continue
        for b in batches:
            s = r.latency_at(b)
            base = eager[r.model].latency_at(b) if r.model in eager else None
            speedup = base.p50_ms / s.p50_ms if s and base and s.p50_ms > 0 else None
            row += [
                f"{s.p50_ms:.2f} / {s.p99_ms:.2f}" if s else "–",
                _fmt(s.throughput_per_s if s else None, ".1f"),
                _fmt(speedup, ".2f") + ("x" if speedup is not None else ""),
            ]
        a = r.accuracy
        row += [
            _fmt(a.top1_agreement * 100 if a and a.top1_agreement is not None else None, ".1f")
            + ("%" if a and a.top1_agreement is not None else ""),
            _fmt(a.max_abs_error if a else None, ".2e"),
            _fmt(a.cosine_similarity if a else None, ".6f"),
            _fmt(r.compile_time_s, ".1f"),
            _fmt(r.artifact_bytes / 1e6 if r.artifact_bytes else None, ".1f"),
            _memory_cell(r.memory),
        ]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    text += (
        "\nLatency: median (p50) and p99 of one call, ms. Speedup: torch-eager p50 / this p50 at the "
        "same batch size, same run. Accuracy columns compare with the FP32 torch model on the same "
        "inputs (top-1 agreement for classifiers). Peak RSS: the whole process during the warm-up calls; "
        "(+calls): how far it rose above its level before them.\n"
    )
    if notes:
        text += "\n" + "\n".join(f"[{i}] {note}" for i, note in enumerate(notes, start=1)) + "\n"
    return text


def plot_latency_vs_accuracy(report: BenchReport, path: str | os.PathLike[str] | None = None, batch_size: int | None = None):
    """Scatter of p50 latency against accuracy, one colour per model, one marker per precision.

    Accuracy is top-1 agreement with the FP32 torch model where the model is a
    classifier (left panel) and the max absolute error (right panel, log scale).
    Returns the matplotlib figure; saves a PNG when ``path`` is given.
    """
    import matplotlib.pyplot as plt

    ok = [r for r in report.results if r.status == "ok" and r.latency]
    if batch_size is None:
        batch_size = min((s.batch_size for r in ok for s in r.latency), default=1)
    markers = {"torch-eager": "s", "fp32": "o", "fp16": "^", "int8": "D", "fp8": "v"}
    models = sorted({r.model for r in ok})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(models)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in ok:
        s = r.latency_at(batch_size)
        if s is None:
            continue
        key = "torch-eager" if r.runtime == "torch-eager" else r.precision
        a = r.accuracy
        top1 = 100.0 if r.runtime == "torch-eager" else (a.top1_agreement * 100 if a and a.top1_agreement is not None else None)
        err = a.max_abs_error if a else None
        style = dict(color=colours[r.model], marker=markers.get(key, "x"), s=60, edgecolors="black", linewidths=0.5)
        if top1 is not None:
            left.scatter(s.p50_ms, top1, **style)
        if err is not None and r.runtime != "torch-eager":
            right.scatter(s.p50_ms, max(err, 1e-9), **style)
    left.set(xscale="log", xlabel=f"p50 latency at batch {batch_size} (ms, log)", ylabel="top-1 agreement with FP32 torch (%)")
    right.set(xscale="log", yscale="log", xlabel=f"p50 latency at batch {batch_size} (ms, log)", ylabel="max |output - FP32 torch|")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 20, 50, not 2x10^1
        ax.xaxis.set_minor_formatter(NullFormatter())
    left.set_ylim(top=101)
    handles = [plt.Line2D([], [], color=colours[m], marker="o", linestyle="", label=m) for m in models]
    handles += [
        plt.Line2D([], [], color="grey", marker=mk, linestyle="", label=key)
        for key, mk in markers.items()
        if any(("torch-eager" if r.runtime == "torch-eager" else r.precision) == key for r in ok)
    ]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    backends = ", ".join(sorted({r.backend for r in ok if r.runtime == "trtopt"})) or "–"
    fig.suptitle(f"Latency against accuracy vs FP32 torch, batch {batch_size} (trtopt on {backends})")
    left.set_title("top-1 agreement: higher is closer", fontsize=10)
    right.set_title("max abs error: lower is closer", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 0.95))
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    return fig


# --------------------------------------------------------------- running things


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
    calibration_data: Any = None,
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
    from .compiler import compile as trtopt_compile, select_backend

    row = dict(model=name, runtime="trtopt", precision=precision, backend=str(backend), device="–")
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
) -> list[BenchResult]:
    """Time every runnable candidate side by side (``measure_side_by_side``); return all results."""
    runnable = [c for c in candidates if c.fn is not None]
    stats, memory = measure_side_by_side(
        [c.fn for c in runnable], make_inputs, batch_sizes, warmup=warmup, iterations=iterations
    )
    for candidate, latency, peak in zip(runnable, stats, memory):
        candidate.result.latency = latency
        candidate.result.memory = peak
    return [c.result for c in candidates]


# ----------------------------------------------------------------- input data


def structured_images(count: int, size: int, *, seed: int = 0) -> torch.Tensor:
    """Image-like inputs ``[count, 3, size, size]``, normalised like ImageNet.

    White noise is a poor stand-in for photographs when calibrating: real
    images are smooth with edges. These are a few random low-frequency
    gratings plus a bright disc and a dark square per image, so activations
    have realistic spatial correlation. Deterministic for a given seed.
    """
    gen = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.zeros(count, 3, size, size)
    for _ in range(3):
        freq = torch.rand(count, 3, 2, generator=gen) * 6 + 0.5
        phase = torch.rand(count, 3, 1, 1, generator=gen) * 2 * math.pi
        images += torch.sin(freq[..., 0, None, None] * math.pi * xx + freq[..., 1, None, None] * math.pi * yy + phase)
    centre = torch.rand(count, 2, generator=gen) * 1.2 - 0.6
    radius = torch.rand(count, generator=gen) * 0.3 + 0.15
    disc = ((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2) < radius[:, None, None] ** 2
    images += 2.0 * disc[:, None].float()
    corner = torch.rand(count, 2, generator=gen) * 1.2 - 0.9
    square = (
        (xx > corner[:, 0, None, None]) & (xx < corner[:, 0, None, None] + 0.4)
        & (yy > corner[:, 1, None, None]) & (yy < corner[:, 1, None, None] + 0.4)
    )
    images -= 2.0 * square[:, None].float()
    pixels = (images - images.amin(dim=(2, 3), keepdim=True)) / (
        images.amax(dim=(2, 3), keepdim=True) - images.amin(dim=(2, 3), keepdim=True) + 1e-6
    )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def prepare_random_model(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """Make a randomly initialised model behave more like a trained one, then set eval mode.

    Freshly initialised torchvision models are degenerate as classifiers:
    MobileNetV3's logits are about 1e-9 and every image gets the same class,
    and ViT's head is initialised to zeros. So BatchNorm running statistics are
    re-estimated on ``images`` (one forward pass in train mode, cumulative
    average), which gives each layer activations of realistic scale, and an
    all-zero Linear layer is re-drawn from N(0, 0.02). The weights stay random:
    accuracy columns measure agreement with this FP32 model, not task accuracy.
    """
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the pass
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear) and not layer.weight.any():
            torch.nn.init.normal_(layer.weight, std=0.02)
    if batchnorms:
        model.train()
        with torch.no_grad():
            model(images)
    return model.eval()


def inputs_for_spec(spec: Any, batch_size: int | None = None, *, seed: int = 0) -> list[torch.Tensor]:
    """Timing inputs for a compiled module: profile 0's opt shape, batch (dim 0) optionally replaced.

    Float inputs are random normal, integer and bool inputs 0 or 1: these are
    for timing, not accuracy.
    """
    gen = torch.Generator().manual_seed(seed)
    profile = spec.profiles[0]
    tensors = []
    for t in spec.inputs:
        shape = list(profile[t.name].opt)
        if batch_size is not None:
            if not shape:
                raise ConfigError(f"input {t.name!r} is a scalar; it has no batch dimension to vary")
            shape[0] = batch_size
        dtype = getattr(torch, t.dtype, None)
        if dtype is None:
            raise InputError(f"input {t.name!r} has dtype {t.dtype}, which the harness cannot generate")
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            tensors.append(torch.randint(0, 2, shape, generator=gen).to(dtype))
    return tensors


# ------------------------------------------------------------- layer profiles


@dataclass(frozen=True)
class LayerTime:
    name: str  # node (ONNX Runtime) or fused layer (TensorRT) name
    op_type: str
    ms: float  # per run: the mean over the profiled runs (ONNX Runtime) or the median (TensorRT)
    # The torch module path of the (first) node the layer runs, '' for the model itself; None when
    # the graph carries no module paths (an ONNX file, the TorchScript exporter, a module saved before).
    module: str | None = None


@dataclass
class LayerProfile:
    """Where the time of one inference goes, per layer."""

    backend: str
    runs: int
    layers: list[LayerTime]

    def per_run_ms(self) -> float:
        return sum(layer.ms for layer in self.layers)

    def by_op_type(self) -> list[tuple[str, float]]:
        """(op type, ms per run), slowest first."""
        totals: dict[str, float] = {}
        for layer in self.layers:
            totals[layer.op_type] = totals.get(layer.op_type, 0.0) + layer.ms
        return sorted(totals.items(), key=lambda kv: -kv[1])

    def top_layers(self, count: int = 10) -> list[LayerTime]:
        """The ``count`` slowest layers."""
        return sorted(self.layers, key=lambda layer: -layer.ms)[:count]

    def by_module(self, depth: int | None = None) -> list[tuple[str, float]]:
        """(torch module path, ms per run), slowest first.

        ``depth=None`` totals per leaf module (the module each layer's node came
        from, e.g. ``layer1.0.conv1``); ``depth=1`` per top-level module
        (``layer1``), ``depth=2`` one level below, and so on. The model's own ops
        (outside any submodule) are ``(root)``; layers without a module path
        are ``(unattributed)``: all of them for a graph without torch metadata,
        else the few a backend adds on its own (ONNX Runtime's layout reorders).
        """
        from .names import ROOT

        totals: dict[str, float] = {}
        for layer in self.layers:
            if layer.module is None:
                key = "(unattributed)"
            elif not layer.module:
                key = ROOT
            else:
                key = layer.module if depth is None else ".".join(layer.module.split(".")[:depth])
            totals[key] = totals.get(key, 0.0) + layer.ms
        return sorted(totals.items(), key=lambda kv: -kv[1])


def parse_onnxruntime_profile(events: Sequence[Mapping[str, Any]], skip_runs: int = 1) -> LayerProfile:
    """Aggregate an ONNX Runtime profiling trace (Chrome trace JSON) per node.

    Each ``model_run`` event spans one ``InferenceSession.run``; node events
    named ``<node>_kernel_time`` inside it carry the kernel's duration (µs) and
    its ``op_name``. The first ``skip_runs`` runs are warm-up and dropped; a
    node's time is its mean per kept run. Node names are those of ORT's
    optimised graph, so fused nodes (e.g. Conv+Relu as ``FusedConv``) appear
    once, under a name ORT chose.
    """
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    kept = runs[skip_runs:]
    if not kept:
        raise InputError(
            f"the ONNX Runtime trace holds {len(runs)} run(s); profile more than skip_runs={skip_runs}"
        )
    totals: dict[str, list[Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in kept):
            continue
        node = e["name"][: -len("_kernel_time")]
        entry = totals.setdefault(node, [e.get("args", {}).get("op_name", "?"), 0.0])
        entry[1] += e["dur"] / 1000.0
    layers = [LayerTime(name, op, total / len(kept)) for name, (op, total) in totals.items()]
    return LayerProfile(backend="onnxruntime", runs=len(kept), layers=layers)


def attribute_modules(profile: LayerProfile, onnx_model: Any) -> LayerProfile:
    """``profile`` with each layer's torch module path, read from ``onnx_model``'s node metadata.

    A layer is attributed to the first node of the graph it names: ONNX Runtime
    names a fused node after its first node, TensorRT a fused layer ``a + b``
    (``trtopt.names.layer_module``).
    """
    from .names import layer_module, node_modules, tensor_producers

    modules = node_modules(onnx_model)
    if not modules:
        return profile
    producers = tensor_producers(onnx_model)
    layers = [
        LayerTime(layer.name, layer.op_type, layer.ms, layer_module(layer.name, modules, producers, layer.op_type))
        for layer in profile.layers
    ]
    return LayerProfile(backend=profile.backend, runs=profile.runs, layers=layers)


def profile_onnxruntime(module: Any, inputs: Sequence[torch.Tensor], *, runs: int = 10) -> LayerProfile:
    """Per-node times of ``module``'s graph under ONNX Runtime's profiler (one warm-up run dropped)."""
    from .backends.onnxruntime import make_session

    if runs < 1:
        raise ConfigError(f"runs={runs}; profile at least 1 run")
    feeds = {t.name: x.detach().cpu().numpy() for t, x in zip(module.spec.inputs, inputs)}
    with tempfile.TemporaryDirectory(prefix="trtopt-profile-") as tmp:
        session = make_session(module.onnx_model, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(runs + 1):
            session.run(None, feeds)
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
    return attribute_modules(parse_onnxruntime_profile(events, skip_runs=1), module.onnx_model)


def profile_tensorrt(module: Any, inputs: Sequence[torch.Tensor], *, runs: int = 10) -> LayerProfile:
    """Per-layer median times of a TensorRT-backed module, from TensorRT's ``IProfiler``.

    The runtime profiles on a separate execution context (``profile_layers``);
    each layer's type comes from the engine inspector (``layer_information``),
    which names types only when the engine was built with detailed profiling
    verbosity ("?" otherwise). Layer names are TensorRT's, after fusion.
    """
    from .module import select_profile

    if module.backend_name != "tensorrt":
        raise ConfigError(
            f"the module runs on {module.backend_name}; compile or load it with backend='tensorrt' "
            "(or use profile_onnxruntime)"
        )
    feeds = {t.name: x for t, x in zip(module.spec.inputs, inputs)}
    index = select_profile(module.profiles, {n: tuple(x.shape) for n, x in feeds.items()})
    medians = module.backend.profile_layers(feeds, index, runs)
    op_types = {
        layer.get("Name", ""): str(layer.get("LayerType", "?"))
        for layer in module.backend.layer_information().get("Layers", [])
        if isinstance(layer, Mapping)
    }
    layers = [LayerTime(name, op_types.get(name, "?"), ms) for name, ms in medians]
    return attribute_modules(LayerProfile(backend="tensorrt", runs=runs, layers=layers), module.onnx_model)


def plot_layer_profile(profile: LayerProfile, count: int = 12):
    """Bar charts: time per op type and the slowest layers (named by module path and op); and, when the
    layers carry module paths, time per top-level module and per leaf module. Returns the figure."""
    import matplotlib.pyplot as plt

    with_modules = any(layer.module is not None for layer in profile.layers)
    rows = 2 if with_modules else 1
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.5 * rows), squeeze=False)
    left, right = axes[0]
    ops = profile.by_op_type()[:count]
    left.barh([op for op, _ in ops][::-1], [ms for _, ms in ops][::-1], color="tab:blue")
    left.set(xlabel="ms per run", title=f"time per op type ({profile.backend})")
    top = profile.top_layers(count)
    right.barh([_short(f"{t.name} ({t.op_type})") for t in top][::-1], [t.ms for t in top][::-1], color="tab:orange")
    right.set(xlabel="ms per run", title=f"slowest {len(top)} layers")
    if with_modules:
        for ax, depth, title, color in (
            (axes[1][0], 1, "time per top-level module", "tab:green"),
            (axes[1][1], None, f"slowest {count} leaf modules", "tab:purple"),
        ):
            totals = profile.by_module(depth)[:count]
            ax.barh([_short(name) for name, _ in totals][::-1], [ms for _, ms in totals][::-1], color=color)
            ax.set(xlabel="ms per run", title=title)
    fig.tight_layout()
    return fig


def _short(label: str, width: int = 48) -> str:
    """Keep the end of a long label: a module path's last parts say the most."""
    return label if len(label) <= width else "..." + label[-(width - 3):]
