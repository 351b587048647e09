"""Compare torch eager with trtopt at FP32, FP16, INT8 and FP8 on real architectures.

Every row is measured in the same process and run, on the same inputs:
torch eager (the FP32 baseline) first, then trtopt at each precision. The
output directory gets ``compare_precisions.json`` (schema ``trtopt-bench``),
``compare_precisions.md`` (the table) and ``compare_precisions.png`` (latency
against accuracy).

Models are torchvision's with random weights (no downloads): ResNet-18,
ResNet-50, MobileNetV3 small and large, and ViT-B/16 (a transformer encoder).
Accuracy is agreement with the FP32 torch model on structured synthetic images
(``trtopt.bench.structured_images``); INT8 (and the FP16 overflow check) is
calibrated on other images from the same generator. FP8 runs where the backend
can run it: ONNX Runtime emulates its Q/DQ on any CPU, TensorRT needs a GPU of
compute capability 8.9+ (elsewhere the row is "skipped" with the reason). Random weights make degenerate classifiers, so
``trtopt.bench.prepare_random_model`` re-estimates BatchNorm statistics first (see there).

Each model's variants are timed interleaved, one call of each per round
(``trtopt.bench.measure_side_by_side``), so that other load on the machine
falls on all of them alike and the speedups stay fair.

The defaults are sized for a small CPU machine (about 15 minutes on 2 cores):
224x224 images, batch sizes 1 and 4, 10 timed iterations (in 5 rounds)
after 2 warm-up calls. On a GPU use more, e.g.::

    python benchmarks/compare_precisions.py --backend tensorrt --batch-sizes 1,8,32 \\
        --iterations 200 --warmup 20

A precision that this trtopt cannot build, or a backend that cannot run here,
appears as a "skipped" row with the reason.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import trtopt
from trtopt import bench
from trtopt.export import forward_input_names
from trtopt.files import atomic_write

logger = logging.getLogger("compare_precisions")

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
STEM = "compare_precisions"


def _torchvision(name: str) -> Callable[[int], torch.nn.Module]:
    def build(image_size: int) -> torch.nn.Module:
        import torchvision

        kwargs = {"image_size": image_size} if name.startswith("vit") else {}
        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


MODELS: dict[str, Callable[[int], torch.nn.Module]] = {
    name: _torchvision(name)
    for name in ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "vit_b_16")
}
PRECISIONS = ("fp32", "fp16", "int8", "fp8")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,8") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,8")
    return values


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {','.join(allowed)}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="torch eager vs trtopt at fp32/fp16/int8/fp8: latency, accuracy, size, memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", type=_choices(tuple(MODELS)), default=list(MODELS), help="comma-separated")
    parser.add_argument("--precisions", type=_choices(PRECISIONS), default=list(PRECISIONS), help="comma-separated")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 4], help="comma-separated")
    parser.add_argument("--backend", choices=[b.value for b in trtopt.Backend], default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where torch eager runs and the timing inputs live (cuda on a GPU machine)")
    parser.add_argument("--iterations", type=int, default=10, help="timed calls per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per batch size")
    parser.add_argument("--image-size", type=int, default=224, help="ViT needs a multiple of 16")
    parser.add_argument("--eval-samples", type=int, default=32, help="images for the accuracy columns")
    parser.add_argument("--calib-samples", type=int, default=32, help="images to calibrate INT8 and FP8 with")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings")
    args = parser.parse_args(argv)
    if args.image_size % 16 and "vit_b_16" in args.models:
        parser.error(f"--image-size {args.image_size}: vit_b_16 needs a multiple of 16")
    return args


def run(args: argparse.Namespace) -> bench.BenchReport:
    batch_sizes = sorted(set(args.batch_sizes))
    size = args.image_size
    eval_images = bench.structured_images(args.eval_samples, size, seed=args.seed + 1)
    calib_images = bench.structured_images(args.calib_samples, size, seed=args.seed + 2)
    stats_images = bench.structured_images(16, size, seed=args.seed + 4)
    chunk = max(batch_sizes)

    device = torch.device(args.device)

    def make_inputs(batch: int) -> tuple[torch.Tensor]:
        return (bench.structured_images(batch, size, seed=args.seed + 3).to(device),)

    results = []
    for number, name in enumerate(args.models, start=1):
        started = time.perf_counter()
        torch.manual_seed(args.seed)
        model = bench.prepare_random_model(MODELS[name](size), stats_images)
        eager = copy.deepcopy(model).to(device)  # trtopt compiles from the CPU copy
        reference = bench.torch_reference(eager, (eval_images.to(device),), chunk)
        candidates = [bench.torch_candidate(name, eager)]
        (input_name,) = forward_input_names(model, 1)
        lo, hi = min(batch_sizes), max(batch_sizes)
        dynamic = {input_name: {0: (lo, hi, hi)}} if lo != hi else None
        calibration = [
            {input_name: calib_images[i : i + chunk]} for i in range(0, len(calib_images), chunk)
        ]
        for precision in args.precisions:
            logger.info("[%d/%d] %s: compiling at %s (%s)", number, len(args.models), name, precision, args.backend)
            candidates.append(
                bench.trtopt_candidate(
                    name,
                    model,
                    (bench.structured_images(hi, size, seed=args.seed + 3),),
                    precision=precision,
                    backend=args.backend,
                    dynamic_shapes=dynamic,
                    calibration_data=calibration if precision != "fp32" else None,  # fp16: overflow check
                    eval_inputs=(eval_images.to(device),),
                    reference=reference,
                    eval_chunk=chunk,
                )
            )
        runnable = sum(c.fn is not None for c in candidates)
        logger.info("[%d/%d] %s: timing %d variants side by side", number, len(args.models), name, runnable)
        results += bench.run_side_by_side(
            candidates, make_inputs, batch_sizes, warmup=args.warmup, iterations=args.iterations
        )
        del eager, candidates
        logger.info("[%d/%d] %s: done in %.0f s", number, len(args.models), name, time.perf_counter() - started)
    settings = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in vars(args).items()
        if key != "quiet"
    }
    settings["command"] = " ".join(["python benchmarks/compare_precisions.py", *sys.argv[1:]])
    return bench.BenchReport(results=results, settings=settings)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    logging.getLogger("trtopt").setLevel(logging.WARNING)  # the harness's own progress is enough
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    report = run(args)
    out = args.out
    json_path = report.write_json(out / f"{STEM}.json")
    md = report.markdown()
    atomic_write(out / f"{STEM}.md", md)
    bench.plot_latency_vs_accuracy(report, out / f"{STEM}.png")
    print(md)
    logger.info("wrote %s, %s.md and %s.png", json_path, STEM, STEM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
