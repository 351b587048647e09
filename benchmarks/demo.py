"""The main job of `make demo`: what each precision costs, on real data and on a real-sized network.

1. A CNN trained here in seconds on scikit-learn's digits (real 8x8 images, 10
   classes, 500 held-out test images), compiled at FP32, FP16 and INT8: held-out
   top-1 accuracy, agreement with the FP32 module, trtopt's own accuracy readout
   (measured at compile time on held-back calibration batches) and latency.
2. torchvision ResNet-18 (random weights: no download is possible here), to show
   latency at a realistic size: median latency at batch 1 and 8, and max error /
   top-1 agreement against the FP32 torch model on the same inputs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trtopt  # noqa: E402
from trtopt.bench.digits import DigitsCNN, load_digits, top1, train  # noqa: E402


def median_ms(fn: Any, x: torch.Tensor, iterations: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def settings(precision: str) -> dict[str, str]:
    """compile's settings for a demo row: "int8-cpu" is INT8 in the CPU layout (int8_layout="cpu")."""
    if precision == "int8-cpu":
        return {"precision": "int8", "int8_layout": "cpu"}
    return {"precision": precision}


def digits_table(precisions: list[str], iterations: int) -> None:
    digits = load_digits()
    start = time.perf_counter()
    model = train(DigitsCNN, digits, epochs=8)
    trained = time.perf_counter() - start
    calibration = list(torch.split(digits.train_x[:320], 64))  # training images only; trtopt holds back the last
    x1, x64 = digits.test_x[:1], digits.test_x[:64]
    with torch.no_grad():
        rows = [("torch eager", "fp32", median_ms(model, x1, iterations), median_ms(model, x64, iterations),
                 top1(model(digits.test_x), digits.test_y), None, "")]
    reference = None
    for precision in precisions:
        compiled = trtopt.compile(
            model, (digits.test_x[:4],), **settings(precision), dynamic_shapes={"x": {0: (1, 64, 512)}},
            calibration_data=None if precision == "fp32" else calibration,
        )
        logits = compiled(digits.test_x)
        reference = logits if precision == "fp32" else reference
        agree = None if reference is None else float((logits.argmax(1) == reference.argmax(1)).float().mean())
        readout = compiled.precision_report.accuracy
        rows.append(
            (f"trtopt {compiled.backend_name}", precision, median_ms(compiled, x1, iterations),
             median_ms(compiled, x64, iterations), top1(logits, digits.test_y), agree,
             "" if readout is None else f"cosine {readout.cosine:.4f}")
        )
    print(f"\nDigits CNN trained here in {trained:.0f} s, {len(digits.test_y)} held-out test images, median of {iterations} runs")
    print(f"{'backend':<22} {'precision':<9} {'batch 1 ms':>10} {'batch 64 ms':>11} {'top-1 %':>8} {'vs FP32':>8}  readout")
    for backend, precision, ms1, ms64, accuracy, agree, readout in rows:
        agreed = "" if agree is None else f"{agree:.1%}"
        print(f"{backend:<22} {precision:<9} {ms1:>10.2f} {ms64:>11.2f} {accuracy:>8.2f} {agreed:>8}  {readout}")


def resnet_table(precisions: list[str], size: int, iterations: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x1, x8 = torch.randn(1, 3, size, size), torch.randn(8, 3, size, size)
    calibration = [torch.randn(8, 3, size, size) for _ in range(5)]
    with torch.no_grad():
        reference = model(x8)
        rows = [("torch eager", "fp32", median_ms(model, x1, iterations), median_ms(model, x8, iterations), 0.0, 1.0)]
        for precision in precisions:
            compiled = trtopt.compile(
                model, (x1,), **settings(precision), dynamic_shapes={"x": {0: (1, 8, 16)}},
                calibration_data=None if precision == "fp32" else calibration,
            )
            out = compiled(x8)
            rows.append(
                (f"trtopt {compiled.backend_name}", precision, median_ms(compiled, x1, iterations),
                 median_ms(compiled, x8, iterations), float((out - reference).abs().max()),
                 float((out.argmax(1) == reference.argmax(1)).float().mean()))
            )
    print(f"\nResNet-18, {size}x{size}, random weights, median of {iterations} runs")
    print(f"{'backend':<22} {'precision':<9} {'batch 1 ms':>10} {'batch 8 ms':>10} {'max abs err':>12} {'top-1 agree':>11}")
    for backend, precision, ms1, ms8, err, agree in rows:
        print(f"{backend:<22} {precision:<9} {ms1:>10.2f} {ms8:>10.2f} {err:>12.2e} {agree:>11.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--precisions", default="fp32,fp16,int8,int8-cpu",
                        help="comma-separated; int8-cpu is INT8 with int8_layout='cpu' (ONNX Runtime only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("trtopt").setLevel(logging.INFO)
    for noisy in ("trtopt.export", "trtopt.graph", "trtopt.precision.fp16", "trtopt.precision.int8"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    precisions = args.precisions.split(",")
    digits_table(precisions, max(args.iterations, 20))
    resnet_table(precisions, args.image_size, args.iterations)


if __name__ == "__main__":
    main()
