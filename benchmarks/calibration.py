"""Calibration benchmark: trtopt's calibrators against onnxruntime.quantization, side by side.

One run exports a torchvision ResNet-18 (random weights, eval mode, 64x64 input)
through trtopt's own export and cleanup, then calibrates the same graph on the
same data with every configuration below, for 16, 64 and 256 batches:

* ``trtopt-entropy``: ``trtopt.calibrators.calibrate(method="entropy")``
  (2048 bins, 128 levels, TensorRT's search),
* ``trtopt-auto``: ``method="auto"``, the default (entropy, percentile, MSE and
  minmax ranges from the one histogram, the least-error one that clips little),
* ``trtopt-minmax``: max |x| (the reference that shows what a degenerate
  entropy search returns),
* ``ort-entropy-default``: onnxruntime's entropy calibrator with its defaults
  (``num_bins=128, num_quantized_bins=128``),
* ``ort-entropy-2048``: the same with ``num_bins=2048, num_quantized_bins=128``.

Both tools calibrate the same tensors: the ones onnxruntime selects by default
(every float input and output of every node). Each (configuration, batch count)
runs in a fresh subprocess, so the memory figures do not mix: ``peak_rss_mb`` is
the child's peak resident set, VmHWM from ``/proc/self/status`` at its end (not
``ru_maxrss``, which Linux carries over from the parent across fork+exec), and
``baseline_rss_mb`` its RSS (VmRSS) just before calibration starts, after imports and model loading (trtopt's child imports torch, hence its
higher baseline). ``wall_s`` is calibration only: session creation, every batch,
and the range computation; not interpreter start-up or imports. Batches are
generated on the fly from a per-batch seed (uniform noise in [0, 1] normalised
with ImageNet's mean and std), so the data costs no memory and both tools see the
same values.

Agreement is the relative difference of amax per tensor, ``|a - b| / b``, against
trtopt's entropy (and, for onnxruntime's default, against minmax too).

    python benchmarks/calibration.py            # writes benchmarks/results/calibration.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = ("trtopt-entropy", "trtopt-auto", "trtopt-minmax", "ort-entropy-default", "ort-entropy-2048")
ORT_OPTIONS = {
    "ort-entropy-default": {},
    "ort-entropy-2048": {"num_bins": 2048, "num_quantized_bins": 128},
}
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def make_batch(index: int, batch_size: int, image_size: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + index)
    images = rng.random((batch_size, 3, image_size, image_size), dtype=np.float32)
    return (images - MEAN) / STD


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM).

    Not ``ru_maxrss``: Linux carries that across fork+exec, so a child reports at least
    the parent's peak (here the parent ran the export, about 1.5 GB).
    """
    return _status_mb("VmHWM")


def prepare(workdir: Path, batch_size: int, image_size: int) -> list[str]:
    """Export ResNet-18 with trtopt, save it, and return the tensors onnxruntime would calibrate."""
    import onnx
    import torch
    import torchvision
    from onnxruntime.quantization.calibrate import create_calibrator

    from trtopt.profiles import build_profiles
    from trtopt.export import export
    from trtopt.graph import cleanup, save_model

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    example = torch.from_numpy(make_batch(0, batch_size, image_size))
    profiles = build_profiles(None, {"x": tuple(example.shape)})
    exported = export(model, (example,), profiles, 19, input_names=["x"])
    cleaned, _ = cleanup(exported.model)
    path = save_model(cleaned, workdir / "resnet18.onnx")
    calibrator = create_calibrator(path, augmented_model_path=str(workdir / "selection.onnx"))
    tensors, _ = calibrator.select_tensors_to_calibrate(onnx.load(path))
    del calibrator
    return sorted(tensors)


def child(config: str, num_batches: int, workdir: Path, batch_size: int, image_size: int, result: Path) -> None:
    """Run one configuration in this (fresh) process and write its figures to ``result``."""
    tensors = json.loads((workdir / "tensors.json").read_text())
    model_path = workdir / "resnet18.onnx"
    batches = (make_batch(k, batch_size, image_size) for k in range(num_batches))
    if config.startswith("trtopt"):
        import onnx

        from trtopt.calibrators import calibrate
        from trtopt.spec import tensor_specs

        model = onnx.load(model_path)
        baseline = rss_mb()
        start = time.perf_counter()
        out = calibrate(
            model,
            tensors,
            batches,
            input_specs=tensor_specs(model.graph.input),
            method=config.split("-")[1],
            progress=False,
        )
        wall = time.perf_counter() - start
        amax = out.amax
    else:
        from onnxruntime.quantization.calibrate import (
            CalibrationDataReader,
            CalibrationMethod,
            create_calibrator,
        )

        class Reader(CalibrationDataReader):
            def get_next(self):
                batch = next(batches, None)
                return None if batch is None else {"x": batch}

        baseline = rss_mb()
        start = time.perf_counter()
        calibrator = create_calibrator(
            model_path,
            augmented_model_path=str(workdir / f"augmented-{config}.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options=ORT_OPTIONS[config],
        )
        calibrator.collect_data(Reader())
        ranges = calibrator.compute_data()
        wall = time.perf_counter() - start
        amax = {}
        for name in tensors:
            low, high = ranges[name].range_value
            amax[name] = float(max(abs(float(low)), abs(float(high))))
    peak = peak_rss_mb()
    result.write_text(
        json.dumps({"wall_s": wall, "peak_rss_mb": peak, "baseline_rss_mb": baseline, "amax": amax})
    )


def agreement(amax: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    diffs = [abs(amax[n] - reference[n]) / reference[n] for n in reference if reference[n] > 0]
    return {"median_rel_diff": statistics.median(diffs), "max_rel_diff": max(diffs), "tensors": len(diffs)}


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        "# Calibration: trtopt vs onnxruntime.quantization",
        "",
        f"ResNet-18 (torchvision, random weights), input {setup['batch_size']}x3x{setup['image_size']}x"
        f"{setup['image_size']}, {setup['tensors']} tensors (onnxruntime's default selection), "
        f"{setup['machine']}. Command: `{setup['command']}`.",
        "",
        "Wall time is calibration only (session, batches, ranges); peak RSS is the child process's "
        "peak RSS (VmHWM); baseline is its RSS just before calibration. Agreement: median (max) relative "
        "amax difference per tensor against trtopt entropy at the same batch count.",
        "",
        "| batches | configuration | wall s | peak RSS MB | baseline RSS MB | peak - baseline MB "
        "| vs trtopt entropy | vs trtopt minmax |",
        "|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for row in report["runs"]:
        vs_entropy = row.get("vs_trtopt_entropy")
        vs_minmax = row.get("vs_trtopt_minmax")
        fmt = lambda a: f"{a['median_rel_diff']:.3f} ({a['max_rel_diff']:.3f})" if a else "-"  # noqa: E731
        lines.append(
            f"| {row['batches']} | {row['config']} | {row['wall_s']:.1f} | {row['peak_rss_mb']:.0f} | "
            f"{row['baseline_rss_mb']:.0f} | {row['peak_rss_mb'] - row['baseline_rss_mb']:.0f} | "
            f"{fmt(vs_entropy)} | {fmt(vs_minmax)} |"
        )
    summary = report["summary"]
    lines += ["", "| target | measured |", "|---|---|"]
    if "trtopt_peak_growth_pct" in summary:
        lines.append(
            f"| trtopt entropy peak RSS growth, {summary['min_batches']} -> {summary['max_batches']} "
            f"batches (< 20%) | {summary['trtopt_peak_growth_pct']:+.1f}% |"
        )
    if "ort_2048_peak_growth_pct" in summary:
        lines.append(f"| onnxruntime 2048-bin peak RSS growth, same | {summary['ort_2048_peak_growth_pct']:+.1f}% |")
    for n, ratio in summary.get("speedup_vs_ort_2048", {}).items():
        lines.append(f"| trtopt entropy speed-up vs onnxruntime 2048 bins, {n} batches (>= 5x) | {ratio:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batches[0], args.workdir, args.batch_size, args.image_size, args.result)
        return

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trtopt-calib-bench-") as tmp:
        workdir = Path(tmp)
        tensors = prepare(workdir, args.batch_size, args.image_size)
        (workdir / "tensors.json").write_text(json.dumps(tensors))
        runs = []
        for n in args.batches:
            amax = {}
            for config in args.configs:
                result = workdir / f"{config}-{n}.json"
                command = [
                    sys.executable, __file__, "--child", config, "--batches", str(n),
                    "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
                    "--workdir", str(workdir), "--result", str(result),
                ]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                figures = json.loads(result.read_text())
                amax[config] = figures.pop("amax")
                row = {"batches": n, "config": config, **figures}
                print(f"{n:4d} batches  {config:20s} {row['wall_s']:7.1f} s  {row['peak_rss_mb']:7.0f} MB", flush=True)
                runs.append(row)
            for row in runs:
                if row["batches"] != n:
                    continue
                if row["config"] != "trtopt-entropy" and "trtopt-entropy" in amax:
                    row["vs_trtopt_entropy"] = agreement(amax[row["config"]], amax["trtopt-entropy"])
                if row["config"].startswith("ort") and "trtopt-minmax" in amax:
                    row["vs_trtopt_minmax"] = agreement(amax[row["config"]], amax["trtopt-minmax"])

    def find(config: str, n: int) -> dict:
        return next(r for r in runs if r["config"] == config and r["batches"] == n)

    first, last = min(args.batches), max(args.batches)
    summary = {"min_batches": first, "max_batches": last}
    if "trtopt-entropy" in args.configs:
        summary["trtopt_peak_growth_pct"] = 100 * (
            find("trtopt-entropy", last)["peak_rss_mb"] / find("trtopt-entropy", first)["peak_rss_mb"] - 1
        )
    if "ort-entropy-2048" in args.configs:
        summary["ort_2048_peak_growth_pct"] = 100 * (
            find("ort-entropy-2048", last)["peak_rss_mb"] / find("ort-entropy-2048", first)["peak_rss_mb"] - 1
        )
        if "trtopt-entropy" in args.configs:
            summary["speedup_vs_ort_2048"] = {
                str(n): find("ort-entropy-2048", n)["wall_s"] / find("trtopt-entropy", n)["wall_s"]
                for n in args.batches
            }
    import onnxruntime

    report = {
        "setup": {
            "model": "torchvision resnet18, random weights, eval",
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "tensors": len(tensors),
            "onnxruntime": onnxruntime.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "command": " ".join(["python benchmarks/calibration.py", *sys.argv[1:]]),
            "total_s": time.perf_counter() - started,
        },
        "runs": runs,
        "summary": summary,
    }
    from trtopt.bench.results import write_results

    write_results(args.out, "calibration", report, markdown(report))


if __name__ == "__main__":
    main()
