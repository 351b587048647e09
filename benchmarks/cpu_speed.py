"""CPU latency of trtopt's precisions against onnxruntime's quantize_static and torch eager.

ResNet-18, MobileNetV3-small (torchvision, random weights with BatchNorm statistics
re-estimated on image-like inputs) and a transformer encoder (4 layers, d_model 256,
sequence 128), at batch 1 and 8, on the ONNX Runtime CPU backend. The variants:

- trtopt FP32, FP16 (emulated on the CPU: slower by design), INT8 (the TensorRT-faithful
  graph, run on ONNX Runtime's integer kernels where that is exact) and INT8 with
  ``int8_layout="cpu"`` (uint8 activations with zero points: integer kernels throughout);
- onnxruntime ``quantize_static`` (QDQ, u8 activations, per-channel s8 weights) in a default
  ONNX Runtime session: its own Q/DQ fusions, which saturate on x86 CPUs without VNNI;
- the model in torch eager.

Latency is the median of alternating blocks of calls, in one run, with every
variant on the same inputs; ratios are to trtopt FP32. Accuracy is agreement with
trtopt FP32 on held-out inputs (cosine of all outputs, top-1 agreement for the
classifiers). For INT8 the table also compares the fast CPU graph with the plain
emulation of TensorRT's Q/DQ graph (no integer kernels), which is what the fast
graph must reproduce.

    PYTHONPATH=. python benchmarks/cpu_speed.py       # JSON + markdown in benchmarks/results/
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

import trtopt
from trtopt.bench.results import write_results
from trtopt.executor.session import DISABLED_OPTIMIZERS
from trtopt.bench import prepare_random_model, structured_images
from trtopt.precision import emulate_fp16

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
STEM = "cpu_speed"
BATCHES = (1, 8)
Run = Callable[[np.ndarray], np.ndarray]


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def model_and_data(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, bool]:
    """(model, calibration inputs, held-out inputs, is a classifier)."""
    torch.manual_seed(0)
    if name == "transformer":
        return Encoder().eval(), torch.randn(64, 128, 256), torch.randn(16, 128, 256, generator=torch.Generator().manual_seed(1)), False
    images = structured_images(64, 224, seed=0)
    model = getattr(torchvision.models, name)()
    return prepare_random_model(model, images), images, structured_images(16, 224, seed=1), True


def quantize_static_session(fp32_module: Any, calibration: torch.Tensor, workdir: Path) -> ort.InferenceSession:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    source = fp32_module.export_onnx(workdir / "fp32.onnx")["onnx"]
    name = fp32_module.input_names[0]
    batches = iter([{name: b.numpy()} for b in calibration.split(8)])

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    target = workdir / "quantize_static.onnx"
    quantize_static(
        str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])


def emulation_session(int8_module: Any) -> ort.InferenceSession:
    """TensorRT's Q/DQ graph as it is (float Q/DQ ops, no integer kernels): the reference."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    graph = emulate_fp16(int8_module.onnx_model)
    return ort.InferenceSession(
        graph.SerializeToString(), options, providers=["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )


def session_run(session: ort.InferenceSession) -> Run:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def variants(name: str, workdir: Path) -> tuple[dict[str, Run], np.ndarray, np.ndarray, bool]:
    model, calibration, held_out, classifier = model_and_data(name)
    example = (calibration[:1],)
    dynamic = {"x": {0: (1, max(BATCHES), max(BATCHES))}}
    common = dict(backend="onnxruntime", dynamic_shapes=dynamic)
    batches = list(calibration.split(8))
    fp32 = trtopt.compile(model, example, **common)
    fp16 = trtopt.compile(model, example, precision="fp16", calibration_data=batches, **common)
    int8 = trtopt.compile(model, example, precision="int8", calibration_data=batches, **common)
    cpu_int8 = trtopt.compile(model, example, precision="int8", int8_layout="cpu", calibration_data=batches, **common)

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    runs = {
        "trtopt FP32": fp32,
        "trtopt FP16 (emulated)": fp16,
        "trtopt INT8": int8,
        "trtopt INT8, int8_layout='cpu'": cpu_int8,
        "INT8 TensorRT Q/DQ, emulated as is": session_run(emulation_session(int8)),
        "onnxruntime quantize_static": session_run(quantize_static_session(fp32, calibration, workdir)),
        "torch eager": eager,
    }
    return runs, held_out[:max(BATCHES)].numpy(), held_out.numpy(), classifier


def block_median_ms(runs: dict[str, Run], x: np.ndarray, rounds: int, calls: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            run(x)  # untimed: the previous variant's threads may still be spinning
            for _ in range(calls):
                start = time.perf_counter()
                run(x)
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


def agreement(reference: np.ndarray, result: np.ndarray, classifier: bool) -> dict[str, float]:
    a, b = reference.reshape(-1).astype(np.float64), result.reshape(-1).astype(np.float64)
    scores = {"cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))}
    if classifier:
        scores["top1_agreement"] = float(np.mean(reference.argmax(1) == result.argmax(1)))
    return scores


def measure_model(name: str, rounds: int, calls: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        runs, timed, held_out, classifier = variants(name, Path(tmp))
        outputs = {variant: np.concatenate([run(b) for b in np.split(held_out, len(held_out) // 8)])
                   for variant, run in runs.items()}
        rows = []
        for batch in BATCHES:
            latency = block_median_ms(runs, np.ascontiguousarray(timed[:batch]), rounds, calls)
            for variant in runs:
                rows.append({
                    "model": name, "batch": batch, "variant": variant,
                    "median_ms": round(latency[variant], 3),
                    "ratio_to_fp32": round(latency[variant] / latency["trtopt FP32"], 3),
                    "vs_fp32": agreement(outputs["trtopt FP32"], outputs[variant], classifier),
                })
        emulated = outputs["INT8 TensorRT Q/DQ, emulated as is"]
        for row in rows:
            if row["variant"] == "trtopt INT8":
                row["vs_tensorrt_emulation"] = agreement(emulated, outputs["trtopt INT8"], classifier)
                row["vs_tensorrt_emulation"]["max_abs"] = float(np.abs(emulated - outputs["trtopt INT8"]).max())
        return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"CPU latency on {result['machine']} ({result['cpu_count']} cores), ONNX Runtime {result['onnxruntime']}, "
        f"median of {result['rounds']} x {result['calls']} calls per variant in alternating blocks; "
        "ratio to trtopt FP32 in the same run. Agreement with trtopt FP32 on held-out inputs.",
        "",
        "| model | batch | variant | ms | x FP32 | cosine | top-1 agree |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        agree = row["vs_fp32"]
        top1 = f"{agree['top1_agreement']:.3f}" if "top1_agreement" in agree else "-"
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['variant']} | {row['median_ms']:.2f} | "
            f"{row['ratio_to_fp32']:.2f} | {agree['cosine']:.4f} | {top1} |"
        )
    lines += ["", "trtopt INT8 (integer kernels) against TensorRT's Q/DQ graph emulated as is:", ""]
    for row in result["rows"]:
        if "vs_tensorrt_emulation" in row and row["batch"] == BATCHES[0]:
            check = row["vs_tensorrt_emulation"]
            top1 = f", top-1 agreement {check['top1_agreement']:.3f}" if "top1_agreement" in check else ""
            lines.append(f"- {row['model']}: cosine {check['cosine']:.6f}, max abs {check['max_abs']:.4g}{top1}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_small", "transformer"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        print(f"{name} ...", flush=True)
        rows += measure_model(name, args.rounds, args.calls)
    result = {
        "schema": "trtopt-cpu-speed",
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "rounds": args.rounds,
        "calls": args.calls,
        "rows": rows,
    }
    write_results(args.out, STEM, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
