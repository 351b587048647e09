"""INT8 accuracy: trtopt against onnxruntime's quantize_static and NVIDIA ModelOpt, side by side.

Same trained models (a CNN and a transformer on scikit-learn's digits), same
FP32 ONNX graph, same calibration set (256 training images), same held-out
evaluation set (500 images), all executed by ONNX Runtime on the CPU. FP16
tensors are rounded to FP16 at every tensor boundary (``emulate_fp16``) for
every quantizer alike, as TensorRT would store them.

Reported per quantizer: top-1 accuracy, its change from FP32, the median
wall time of the whole quantization call (calibration included) over
``--repeats`` runs, and the Q/DQ node count.

    PYTHONPATH=. python benchmarks/int8_accuracy.py            # writes benchmarks/results/int8_accuracy.{json,md}

ModelOpt runs (in a child process) when ``modelopt.onnx.quantization`` imports (its ``[onnx]``
extra pins onnx and onnxruntime-gpu versions that conflict with ours; installing
the pure-Python packages into a separate ``--target`` directory and adding it to
PYTHONPATH is enough on a CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests._digits import DigitsCNN, DigitsTransformer, load_digits, top1, train  # noqa: E402
from trtopt.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from trtopt.calibrators import calibrate  # noqa: E402
from trtopt.config import build_profiles  # noqa: E402
from trtopt.export import export  # noqa: E402
from trtopt.graph import cleanup  # noqa: E402
from trtopt.module import tensor_specs  # noqa: E402
from trtopt.precision import emulate_fp16, feed_batches, plan_int8, to_int8  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def qdq_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def accuracy(model: onnx.ModelProto, x: torch.Tensor, labels: torch.Tensor) -> float:
    model = onnx.shape_inference.infer_shapes(model)  # emulate_fp16 reads the FP16 tensors' types
    return top1(OnnxRuntimeBackend(emulate_fp16(model)).run({"x": x})[0], labels)


Quantizer = Callable[[onnx.ModelProto, list[np.ndarray], Path], tuple[onnx.ModelProto, float]]


def trtopt_int8(method: str, float_precision: str) -> Quantizer:
    def quantize(graph: onnx.ModelProto, calibration: list[np.ndarray], workdir: Path) -> tuple[onnx.ModelProto, float]:
        start = time.perf_counter()
        inputs = tensor_specs(graph.graph.input)
        _, batches = feed_batches(calibration, inputs)
        plan = plan_int8(graph)
        amax = calibrate(graph, plan.activation_tensors, calibration, input_specs=inputs, method=method, progress=False).amax
        quantized = to_int8(graph, plan, amax, batches, float_precision=float_precision)[0]
        return quantized, time.perf_counter() - start

    return quantize


def onnxruntime_int8(graph: onnx.ModelProto, calibration: list[np.ndarray], workdir: Path) -> tuple[onnx.ModelProto, float]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"x": batch}

    source, target = workdir / "fp32.onnx", workdir / "ort_int8.onnx"
    onnx.save(graph, source)
    start = time.perf_counter()
    quantize_static(
        str(source),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return onnx.load(target), time.perf_counter() - start


# ModelOpt patches onnxruntime.quantization when imported, which breaks quantize_static
# afterwards in the same process; it runs in a child process, timing itself there.
_MODELOPT_SCRIPT = """
import json, sys, time
import numpy as np
from modelopt.onnx.quantization import quantize
source, data, target = sys.argv[1:4]
start = time.perf_counter()
quantize(source, quantize_mode="int8", calibration_data={"x": np.load(data)}, calibration_method="entropy",
         calibration_eps=["cpu"], high_precision_dtype="fp16", output_path=target, log_level="ERROR")
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def modelopt_int8(graph: onnx.ModelProto, calibration: list[np.ndarray], workdir: Path) -> tuple[onnx.ModelProto, float]:
    source, data, target = workdir / "fp32.onnx", workdir / "calibration.npy", workdir / "modelopt_int8.onnx"
    onnx.save(graph, source)
    np.save(data, np.concatenate(calibration))
    done = subprocess.run(
        [sys.executable, "-c", _MODELOPT_SCRIPT, str(source), str(data), str(target)],
        capture_output=True, text=True, check=True,
    )
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    return onnx.load(target), seconds


def modelopt_version() -> str | None:
    done = subprocess.run(
        [sys.executable, "-c", "import modelopt; print(modelopt.__version__)"], capture_output=True, text=True
    )
    return done.stdout.strip() or None if done.returncode == 0 else None


def modelopt_available() -> str | None:
    done = subprocess.run(
        [sys.executable, "-c", "import modelopt.onnx.quantization"], capture_output=True, text=True
    )
    if done.returncode:
        return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "import failed"
    return None


QUANTIZERS: dict[str, Quantizer] = {
    "trtopt entropy (rest fp16)": trtopt_int8("entropy", "fp16"),
    "trtopt entropy (rest fp32)": trtopt_int8("entropy", "fp32"),
    "trtopt percentile 99.99 (rest fp16)": trtopt_int8("percentile", "fp16"),
    "onnxruntime quantize_static (QDQ, per-channel, symmetric, entropy)": onnxruntime_int8,
    "modelopt int8 entropy (rest fp16)": modelopt_int8,
}


def run_model(name: str, seeds: list[int], repeats: int) -> dict[str, object]:
    """Every quantizer on the same graph and data, for models trained from each seed."""
    digits = load_digits()
    rows = name == "transformer"
    x = digits.test_x[:, 0] if rows else digits.test_x
    calibration = [b.numpy() for b in digits.calibration_batches(rows=rows)]
    skip_modelopt = modelopt_available()
    per_seed: dict[str, list[dict[str, float]]] = {"fp32 (reference)": []}
    for seed in seeds:
        model = train(DigitsTransformer if rows else DigitsCNN, digits, rows=rows, epochs=10 if rows else 8, seed=seed)
        profiles = build_profiles({"x": {0: (1, 64, 512)}}, {"x": tuple(x[:4].shape)})
        graph = cleanup(export(model, (x[:4],), profiles, 19, input_names=["x"]).model)[0]
        fp32 = accuracy(graph, x, digits.test_y)
        per_seed["fp32 (reference)"].append({"top1": fp32, "seconds": 0.0, "qdq_nodes": 0})
        for label, quantize in QUANTIZERS.items():
            if label.startswith("modelopt") and skip_modelopt:
                continue
            times = []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    quantized, seconds = quantize(graph, calibration, Path(tmp))
                    times.append(seconds)
            top = accuracy(quantized, x, digits.test_y)
            per_seed.setdefault(label, []).append(
                {"top1": top, "delta": top - fp32, "seconds": statistics.median(times), "qdq_nodes": qdq_count(quantized)}
            )
            logging.info("%s seed %d / %s: %.2f%% (%+.2f)", name, seed, label, top, top - fp32)
    results = []
    for label in [*per_seed, *(["modelopt int8 entropy (rest fp16)"] if skip_modelopt else [])]:
        runs = per_seed.get(label)
        if not runs:
            results.append({"quantizer": label, "skipped": skip_modelopt})
            continue
        fp32_mean = statistics.mean(r["top1"] for r in per_seed["fp32 (reference)"])
        mean = statistics.mean(r["top1"] for r in runs)
        results.append(
            {
                "quantizer": label,
                "top1": mean,
                "delta": mean - fp32_mean,
                "worst_delta": min(r.get("delta", 0.0) for r in runs),
                "seconds": statistics.median(r["seconds"] for r in runs) if label != "fp32 (reference)" else None,
                "qdq_nodes": runs[0]["qdq_nodes"],
                "per_seed": runs,
            }
        )
    return {
        "model": name,
        "seeds": seeds,
        "eval_images": len(x),
        "calibration_images": sum(len(c) for c in calibration),
        "rows": results,
    }


def markdown(report: dict[str, object]) -> str:
    lines = [
        "# INT8 accuracy: trtopt vs onnxruntime quantize_static vs ModelOpt",
        "",
        f"Command: `{report['command']}`  ",
        f"Top-1: mean over models trained from seeds {report['seeds']} (the worst seed's change from FP32 "
        f"in brackets); time: median of {report['repeats']} runs per seed, then over seeds. ONNX Runtime "
        f"{report['onnxruntime']} on the CPU ({report['machine']}); ModelOpt {report['modelopt'] or 'not installed'}.",
        "",
    ]
    for entry in report["models"]:
        lines += [
            f"## {entry['model']} ({entry['eval_images']} held-out digits, {entry['calibration_images']} calibration images)",
            "",
            "| quantizer | top-1 % | vs FP32, points (worst seed) | quantize time (s) | time vs trtopt | Q/DQ nodes |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        base = next(r["seconds"] for r in entry["rows"] if r["quantizer"].startswith("trtopt entropy (rest fp16)"))
        for row in entry["rows"]:
            if "skipped" in row:
                lines.append(f"| {row['quantizer']} | not run: {row['skipped']} | | | | |")
                continue
            seconds = "" if row["seconds"] is None else f"{row['seconds']:.2f}"
            ratio = "" if row["seconds"] is None else f"{row['seconds'] / base:.2f}x"
            lines.append(
                f"| {row['quantizer']} | {row['top1']:.2f} | {row['delta']:+.2f} ({row['worst_delta']:+.2f}) | "
                f"{seconds} | {ratio} | {row['qdq_nodes']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "transformer"], choices=["cnn", "transformer"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("trtopt", "modelopt", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = {
        "command": " ".join(
            [f"PYTHONPATH={os.environ.get('PYTHONPATH', '.')}", "python benchmarks/int8_accuracy.py", *sys.argv[1:]]
        ),
        "modelopt": modelopt_version(),
        "repeats": args.repeats,
        "seeds": args.seeds,
        "onnxruntime": onnxruntime.__version__,
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "models": [run_model(name, args.seeds, args.repeats) for name in args.models],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    from trtopt._io import atomic_write

    atomic_write(args.out / "int8_accuracy.json", json.dumps(report, indent=1))
    atomic_write(args.out / "int8_accuracy.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
