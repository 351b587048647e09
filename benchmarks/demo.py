"""The main job of `make demo`: compile torchvision ResNet-18 and compare it with torch.

Prints one row per (backend, precision): median latency at batch 1 and 8, and the
max abs error / top-1 agreement against the FP32 torch model on the same inputs.
Random weights (no download is possible here); the numbers show the pipeline
working end to end on this machine, not a trained model's accuracy.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import torchvision

import trtopt


def median_ms(fn, x: torch.Tensor, iterations: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    size = args.image_size
    x1, x8 = torch.randn(1, 3, size, size), torch.randn(8, 3, size, size)
    calibration = [torch.randn(8, 3, size, size) for _ in range(4)]
    with torch.no_grad():
        reference = model(x8)
        rows = [("torch eager", "fp32", median_ms(model, x1, args.iterations), median_ms(model, x8, args.iterations), 0.0, 1.0)]
        for precision in args.precisions.split(","):
            try:
                compiled = trtopt.compile(
                    model,
                    (x1,),
                    precision=precision,
                    dynamic_shapes={"x": {0: (1, 8, 16)}},
                    calibration_data=calibration if precision == "int8" else None,
                )
            except trtopt.TrtoptError as exc:
                print(f"skipping {precision}: {exc}")
                continue
            out = compiled(x8)
            rows.append(
                (
                    f"trtopt {compiled.backend_name}",
                    precision,
                    median_ms(compiled, x1, args.iterations),
                    median_ms(compiled, x8, args.iterations),
                    float((out - reference).abs().max()),
                    float((out.argmax(1) == reference.argmax(1)).float().mean()),
                )
            )
    print(f"\nResNet-18, {size}x{size}, random weights, median of {args.iterations} runs")
    print(f"{'backend':<22} {'precision':<9} {'batch 1 ms':>10} {'batch 8 ms':>10} {'max abs err':>12} {'top-1 agree':>11}")
    for backend, precision, ms1, ms8, err, agree in rows:
        print(f"{backend:<22} {precision:<9} {ms1:>10.2f} {ms8:>10.2f} {err:>12.2e} {agree:>11.1%}")


if __name__ == "__main__":
    main()
