"""A benchmark report for people: the markdown table and the latency-against-accuracy plot."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from ..files import atomic_path
from .memory import MemoryUsage
from .stats import UNSTABLE_SPREAD

if TYPE_CHECKING:
    from .results import BenchReport


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _size_mb(count: int | None) -> str:
    """Megabytes with one decimal, and two significant digits below 0.1 MB (a small model is not "0.0")."""
    if not count:
        return "–"
    mb = count / 1e6
    return f"{mb:.1f}" if mb >= 0.1 else f"{mb:.2g}"


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
    unstable: list[str] = []
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
            if s is not None and s.unstable:
                unstable.append(f"{r.model} {r.runtime} {r.precision} batch {b}: p90 {s.spread:.1f}x p50")
            row += [
                f"{s.p50_ms:.2f} / {s.p99_ms:.2f}" + (" †" if s.unstable else "") if s else "–",
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
            _size_mb(r.artifact_bytes),
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
    threads = sorted({r.threads for r in report.results if r.threads is not None})
    if len(threads) == 1:
        text += (
            f"\nThreads: every CPU row ran with {threads[0]} intra-op thread(s) (torch.set_num_threads for eager, "
            "ONNX Runtime's intra_op_num_threads for trtopt).\n"
        )
    elif threads:
        text += f"\nThreads: rows ran with different intra-op thread counts ({threads}): compare with care.\n"
    if unstable:
        text += (
            f"\n† unstable: the slowest tenth of the calls took over {UNSTABLE_SPREAD}x the median "
            "(the machine was busy); compare these rows within this run only: " + "; ".join(unstable) + ".\n"
        )
    if notes:
        text += "\n" + "\n".join(f"[{i}] {note}" for i, note in enumerate(notes, start=1)) + "\n"
    return text


def plot_latency_vs_accuracy(
    report: BenchReport,
    path: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    title: str | None = None,
):
    """Scatter of p50 latency against accuracy, one colour per model, one marker per precision.

    ``title`` heads the figure (name the models' weights there); the batch and backend follow it.

    Accuracy is top-1 agreement with the FP32 torch model where the model is a
    classifier (left panel) and the max absolute error (right panel, log scale).
    Returns the matplotlib figure; saves a PNG when ``path`` is given.
    """
    import matplotlib.pyplot as plt  # the bench extra: only plotting needs it

    ok = [r for r in report.results if r.status == "ok" and r.latency]
    if batch_size is None:
        batch_size = min((s.batch_size for r in ok for s in r.latency), default=1)
    markers = {"torch-eager": "s", "fp32": "o", "fp16": "^", "int8": "D", "fp8": "v"}
    models = sorted({r.model for r in ok})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(models)}
    classifiers = {r.model for r in ok if r.accuracy and r.accuracy.top1_agreement is not None}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in ok:
        s = r.latency_at(batch_size)
        if s is None:
            continue
        key = "torch-eager" if r.runtime == "torch-eager" else r.precision
        a = r.accuracy
        if r.runtime == "torch-eager":  # the reference: 100% of itself, where the model is a classifier
            top1 = 100.0 if r.model in classifiers else None
        else:
            top1 = a.top1_agreement * 100 if a and a.top1_agreement is not None else None
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
    heading = title or "Latency against accuracy vs FP32 torch"
    fig.suptitle(f"{heading}, batch {batch_size} (trtopt on {backends})", fontsize=10 if title else None)
    left.set_title("top-1 agreement: higher is closer", fontsize=10)
    right.set_title("max abs error: lower is closer", fontsize=10)
    longest = max((len(m) for m in models), default=0)
    fig.tight_layout(rect=(0, 0, 0.86 if longest <= 20 else 0.78, 0.95))  # room for the legend's names
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    return fig
