"""Per-call overhead of a compiled module over the raw runtime call it wraps.

A 16 -> 16 Linear is so small that a call is nearly all overhead: trtopt's input
checks, profile selection and conversions, against ``InferenceSession.run`` with
the same arrays (ONNX Runtime backend), or against ``execute_async_v3`` on an
execution context of the same engine with its addresses set once (TensorRT,
CUDA tensors in and out, both followed by a stream synchronize). The variants
alternate in blocks in one run, and the report is the difference of medians, in
microseconds. Target: < 10 us.

    PYTHONPATH=. python benchmarks/overhead.py                      # JSON + markdown in benchmarks/results/
    PYTHONPATH=. python benchmarks/overhead.py --backend tensorrt   # on a machine with TensorRT and a GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import trtopt
from trtopt.bench.results import write_results

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
STEM = "overhead"
TARGET_US = 10.0
# Each trtopt call against the raw call with the same inputs and outputs (a raw call is its own baseline).
BASELINES = {
    "trtopt, numpy input": "raw session.run",
    "trtopt, torch input": "raw session.run, torch in and out",
    "trtopt, CUDA torch input": "raw execute_async_v3",
}


def _block_times(fn: Callable[[], object], calls: int) -> list[float]:
    fn()  # untimed: the previous variant's threads may still be spinning
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def onnxruntime_variants(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    module = trtopt.compile(model, (x,), backend="onnxruntime", dynamic_shapes={"input": {0: (1, len(x), 64)}})
    session = module.backend.session
    names = [o.name for o in session.get_outputs()]
    array = x.numpy()
    feeds = {session.get_inputs()[0].name: array}
    name = session.get_inputs()[0].name

    def raw_torch() -> list[torch.Tensor]:
        # What a hand-written call costs with torch tensors: a numpy view in, tensors out.
        return [torch.from_numpy(o) for o in session.run(names, {name: x.numpy()})]

    return {
        "raw session.run": lambda: session.run(names, feeds),
        "raw session.run, torch in and out": raw_torch,
        "trtopt, numpy input": lambda: module(array),
        "trtopt, torch input": lambda: module(x),
    }


def tensorrt_variants(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The engine trtopt built, run raw: one context, addresses set once, then execute_async_v3."""
    import tensorrt as trt

    module = trtopt.compile(model, (x,), backend="tensorrt", dynamic_shapes={"input": {0: (1, len(x), 64)}})
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(module.engine)
    context = engine.create_execution_context()
    device_x = x.cuda()
    out = torch.empty(len(x), 16, device="cuda")
    context.set_input_shape(module.input_names[0], tuple(device_x.shape))
    context.set_tensor_address(module.input_names[0], device_x.data_ptr())
    context.set_tensor_address(module.output_names[0], out.data_ptr())
    stream = torch.cuda.current_stream()

    def raw() -> None:
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()

    def call() -> None:
        module(device_x)
        stream.synchronize()

    return {"raw execute_async_v3": raw, "trtopt, CUDA torch input": call}


def measure(rounds: int, calls: int, batch: int, backend: str) -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).eval()
    x = torch.randn(batch, 16)
    variants = onnxruntime_variants(model, x) if backend == "onnxruntime" else tensorrt_variants(model, x)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name] += _block_times(fn, calls)
    medians = {name: statistics.median(v) * 1e6 for name, v in samples.items()}
    rows = []
    for name, us in medians.items():
        baseline = BASELINES.get(name, name)
        rows.append({"variant": name, "median_us": round(us, 2), "baseline": baseline,
                     "overhead_us": round(us - medians[baseline], 2)})
    return {
        "schema": "trtopt-overhead",
        "model": "Linear(16, 16)",
        "backend": backend,
        "batch": batch,
        "rounds": rounds,
        "calls_per_block": calls,
        "target_overhead_us": TARGET_US,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "rows": rows,
    }


def markdown(result: dict[str, object]) -> str:
    lines = [
        f"Per-call overhead on {result['model']}, batch {result['batch']}, {result['backend']} backend "
        f"(median of {result['rounds']} x {result['calls_per_block']} calls per variant, alternating blocks).",
        "",
        "| variant | median us | against | overhead us |",
        "|---|---:|---|---:|",
    ]
    for row in result["rows"]:
        against = "" if row["baseline"] == row["variant"] else row["baseline"]
        lines.append(f"| {row['variant']} | {row['median_us']:.2f} | {against} | {row['overhead_us']:+.2f} |")
    lines += ["", f"Target: overhead < {result['target_overhead_us']:.0f} us."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.calls, args.batch, args.backend)
    stem = STEM if args.backend == "onnxruntime" else f"{STEM}_{args.backend}"
    write_results(args.out, stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
