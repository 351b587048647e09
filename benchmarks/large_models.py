"""Large models: compile, save, load and run a stack of Linear layers of 0.5 to 4+ GiB of weights.

Each case runs in a fresh child process, so every peak is its own: a stack of
``layers`` Linear(width, width) layers with generated weights (what the memory
figures depend on is their size, not their values), compiled on the CPU backend,
run, saved, loaded and run again. For every stage the child records the peak
resident set size (the kernel's VmHWM, reset before the stage) and how far it rose
above the stage's start; the ratios are to the weights' bytes. ``baseline`` is the
RSS of the child after its imports, before the model exists: Python, torch, ONNX
and ONNX Runtime, whatever the model's size. Loading runs in a second fresh process
(what a deployment that only loads pays), checked against the compiled module's outputs.

    flock /tmp/trtopt-bigmem.lock env PYTHONPATH=. python benchmarks/large_models.py
    PYTHONPATH=. python benchmarks/large_models.py --cases 0.5:fp32:proto   # weights kept in the proto at 0.5 GiB

The full run needs about 12 GiB of free memory and 15 GiB of free disk (the 4.25 GiB
case: the module file, a copy of the weights loaded from it, and the compile's own).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
STEM = "large_models"
# (GiB of weights, precision); width 8192 throughout except the small extrapolation case.
# ":proto" keeps the weights in the proto at a size that would take the weights-on-disk path (the
# threshold is raised to 1.8 GB, where it was before the passes streamed weights): the comparison row.
# ":disk" forces the weights-on-disk path (the threshold is lowered to 1 MB).
DEFAULT_CASES = (
    "0.5:fp32:proto", "0.5:fp32", "0.5:int8", "2.25:fp32", "2.25:fp16", "2.25:int8", "4.25:fp32",
)
DISK_THRESHOLD = 1_000_000
PROTO_THRESHOLD = 1_800_000_000
TARGET_COMPILE_RATIO = 2.5


def shape_of(gib: float) -> tuple[int, int]:
    """(width, layers) giving about ``gib`` GiB of FP32 weights."""
    width = 4096 if gib < 1 else 8192
    layers = max(1, round(gib * 2**30 / (width * width * 4)))
    return width, layers


# ------------------------------------------------------------------ the child


def _read_status(field: str) -> int | None:
    from trtopt.bench.memory import _read_status as read  # noqa: PLC2701 - the benchmark reads RSS directly

    return read(field)


def _measured(stages: dict[str, dict[str, float]], name: str, fn: Any) -> Any:
    """Run ``fn``, recording its time, peak RSS and growth over its start as ``stages[name]``."""
    from trtopt.bench.memory import PeakMemory

    start = time.perf_counter()
    with PeakMemory() as peak:
        result = fn()
    usage = peak.usage
    stages[name] = {
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_gib": round((usage.peak_rss_bytes or 0) / 2**30, 3),
        "growth_gib": round((usage.growth_bytes or 0) / 2**30, 3),
    }
    return result


class _StagePeaks(logging.Handler):
    """Peak RSS of each compile stage: at the DEBUG line ``trtopt.stages`` logs as a stage ends, the
    kernel's VmHWM (the peak since the last reset) is that stage's, then it is reset for the next."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.peaks: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        stage = str(record.args[0]) if isinstance(record.args, tuple) and record.args else record.getMessage()
        peak = (_read_status("VmHWM") or 0) / 2**30
        self.peaks[stage] = round(max(self.peaks.get(stage, 0.0), peak), 3)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def _child(gib: float, precision: str, threshold: int | None, workdir: Path) -> dict[str, Any]:
    import torch

    import trtopt
    from trtopt import graph

    if threshold is not None:
        graph.EXTERNAL_DATA_THRESHOLD = threshold
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    baseline = _read_status("VmRSS") or 0
    stages: dict[str, dict[str, float]] = {}

    def measured(name: str, fn: Any) -> Any:
        return _measured(stages, name, fn)

    width, layers = shape_of(gib)
    torch.manual_seed(0)

    def build() -> torch.nn.Module:
        with torch.no_grad():
            return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).eval()

    model = measured("build model", build)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    calibration = [(torch.randn(4, width),) for _ in range(8)] if precision != "fp32" else None
    stage_peaks = _StagePeaks()
    stages_logger = logging.getLogger("trtopt.stages")
    stages_logger.setLevel(logging.DEBUG)
    stages_logger.addHandler(stage_peaks)
    # The lambdas below run at once, before the `del` further down (pyflakes reads them after it: F821).
    module = measured(
        "compile",
        lambda: trtopt.compile(
            model,  # noqa: F821
            (x,),
            precision=precision,
            calibration_data=calibration,
            backend="onnxruntime",
        ),
    )
    stages_logger.removeHandler(stage_peaks)
    # The handler reset VmHWM at each stage's end: the compile's peak is the largest of the stages'.
    compile_stage = stages["compile"]
    peak = max([compile_stage["peak_rss_gib"], *stage_peaks.peaks.values()])
    compile_stage["growth_gib"] = round(compile_stage["growth_gib"] + peak - compile_stage["peak_rss_gib"], 3)
    compile_stage["peak_rss_gib"] = peak
    on_disk = graph.weights_dir(module.onnx_model) is not None
    got = measured("run", lambda: module(x))  # noqa: F821
    error = float((got - expected).abs().max() / expected.abs().max())
    path = workdir / f"large-{gib}-{precision}.trtopt"
    measured("save", lambda: module.save(path))  # noqa: F821
    file_bytes = path.stat().st_size
    del module, model
    # Loading runs in a fresh process: what loading costs, not what the compile left behind.
    np.save(path.with_suffix(".npy"), got.numpy())
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--load-child", str(path)], capture_output=True, text=True, timeout=3600
        )
        if done.returncode != 0:
            raise RuntimeError(f"the load child failed: {done.stderr.strip().splitlines()[-3:]}")
        loading = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        path.unlink()
        path.with_suffix(".npy").unlink()
    stages.update(loading["stages"])
    same = loading["loaded_equals_compiled"]
    return {
        "weights_gib": round(weights / 2**30, 3),
        "width": width,
        "layers": layers,
        "precision": precision,
        "weights_on_disk": on_disk,
        "external_data_threshold": graph.EXTERNAL_DATA_THRESHOLD,
        "baseline_rss_gib": round(baseline / 2**30, 3),
        "module_file_gib": round(file_bytes / 2**30, 3),
        "max_rel_error_vs_torch": error,
        "loaded_equals_compiled": same,
        "stages": stages,
        "compile_peak_over_weights": round(stages["compile"]["peak_rss_gib"] * 2**30 / weights, 2),
        # Peak RSS (GiB) within each compile stage (trtopt.stages); the compile's peak is the largest.
        "compile_stage_peak_rss_gib": stage_peaks.peaks,
        "save_growth_over_weights": round(stages["save"]["growth_gib"] * 2**30 / weights, 3),
        "read_growth_over_weights": round(stages["read module file"]["growth_gib"] * 2**30 / weights, 3),
        "load_peak_over_weights": round(stages["load"]["peak_rss_gib"] * 2**30 / weights, 2),
        "load_baseline_rss_gib": loading["baseline_rss_gib"],
    }


def _load_child(path: Path) -> dict[str, Any]:
    import torch

    import trtopt
    from trtopt.module import read_module_file

    stages: dict[str, dict[str, float]] = {}
    baseline = _read_status("VmRSS") or 0
    expected = torch.from_numpy(np.load(path.with_suffix(".npy")))
    _measured(stages, "read module file", lambda: read_module_file(path))
    loaded = _measured(stages, "load", lambda: trtopt.load(path, backend="onnxruntime"))
    x = torch.randn(4, expected.shape[1], generator=torch.Generator().manual_seed(0))
    got = _measured(stages, "run loaded", lambda: loaded(x))
    return {
        "baseline_rss_gib": round(baseline / 2**30, 3),
        "stages": stages,
        "loaded_equals_compiled": bool(torch.equal(got, expected)),
    }


# ------------------------------------------------------------------ the parent


def run_case(case: str, threshold: int | None, workdir: Path) -> dict[str, Any]:
    gib, precision, *flags = case.split(":")
    if "disk" in flags:
        threshold = DISK_THRESHOLD
    if "proto" in flags:
        threshold = PROTO_THRESHOLD
    command = [sys.executable, __file__, "--child", f"{gib}:{precision}", "--workdir", str(workdir)]
    if threshold is not None:
        command += ["--threshold-bytes", str(threshold)]
    print(f"running {case} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"case": case, "status": "failed", "returncode": done.returncode, "error": tail}
    row = {"case": case, "status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| weights | precision | weights on disk | compile peak RSS | x weights | compile s | save: RSS growth "
        "| read file: RSS growth | load peak RSS | run after load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | failed ({r.get('returncode')}) | | | | | | | | |")
            continue
        s = r["stages"]
        lines.append(
            f"| {r['weights_gib']:.2f} GiB ({r['layers']}x{r['width']}) | {r['precision']} | "
            f"{'yes' if r['weights_on_disk'] else 'no'} | {s['compile']['peak_rss_gib']:.2f} GiB | "
            f"{r['compile_peak_over_weights']:.2f} | {s['compile']['seconds']:.0f} | "
            f"{s['save']['growth_gib'] * 1024:.0f} MiB | {s['read module file']['growth_gib'] * 1024:.0f} MiB | "
            f"{s['load']['peak_rss_gib']:.2f} GiB | {'identical' if r['loaded_equals_compiled'] else 'DIFFERS'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", nargs="+", default=list(DEFAULT_CASES), help="GIB:PRECISION[:disk|:proto], e.g. 2.25:fp32 or 0.5:fp32:proto"
    )
    parser.add_argument("--threshold-bytes", type=int, default=None, help="trtopt.graph.EXTERNAL_DATA_THRESHOLD")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--stem", default=STEM, help="file name of the results (.json and .md)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--load-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        print(json.dumps(_load_child(args.load_child)))
        return
    if args.child:
        gib, precision = args.child.split(":")
        print(json.dumps(_child(float(gib), precision, args.threshold_bytes, args.workdir)))
        return
    rows = [run_case(case, args.threshold_bytes, args.workdir) for case in args.cases]
    result = {
        "command": " ".join(["python", "benchmarks/large_models.py", *sys.argv[1:]]),
        "note": "baseline = child's RSS after imports; ratios are to the weights' bytes; machine shared with others",
        "target_compile_peak_over_weights": TARGET_COMPILE_RATIO,
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    from trtopt.bench.results import write_results

    write_results(args.out, args.stem, result, table(rows))


if __name__ == "__main__":
    main()
