"""Per-call overhead of a compiled module over the raw runtime call it wraps.

A 16 -> 16 Linear is so small that a call is nearly all overhead: trtopt's input
checks, profile selection and conversions, against ``InferenceSession.run`` with
the same arrays (ONNX Runtime backend) or ``execute_async_v3`` (TensorRT, where
a GPU exists; not measured here). The variants alternate in blocks in one run,
and the report is the difference of medians, in microseconds. Target: < 10 us.

    PYTHONPATH=. python benchmarks/overhead.py            # JSON + markdown in benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import trtopt
from trtopt.files import atomic_write

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
STEM = "overhead"
TARGET_US = 10.0


def _block_times(fn: Callable[[], object], calls: int) -> list[float]:
    fn()  # untimed: the previous variant's threads may still be spinning
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(rounds: int, calls: int, batch: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).eval()
    x = torch.randn(batch, 16)
    module = trtopt.compile(model, (x,), backend="onnxruntime", dynamic_shapes={"input": {0: (1, batch, 64)}})
    session = module.backend.session
    names = [o.name for o in session.get_outputs()]
    array = x.numpy()
    feeds = {session.get_inputs()[0].name: array}
    variants: dict[str, Callable[[], object]] = {
        "raw session.run": lambda: session.run(names, feeds),
        "trtopt, numpy input": lambda: module(array),
        "trtopt, torch input": lambda: module(x),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name] += _block_times(fn, calls)
    medians = {name: statistics.median(v) * 1e6 for name, v in samples.items()}
    raw = medians["raw session.run"]
    rows = [
        {"variant": name, "median_us": round(us, 2), "overhead_us": round(us - raw, 2)}
        for name, us in medians.items()
    ]
    return {
        "schema": "trtopt-overhead",
        "model": "Linear(16, 16)",
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
        f"Per-call overhead on {result['model']}, batch {result['batch']}, ONNX Runtime backend "
        f"(median of {result['rounds']} x {result['calls_per_block']} calls per variant, alternating blocks).",
        "",
        "| variant | median us | overhead vs raw us |",
        "|---|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['variant']} | {row['median_us']:.2f} | {row['overhead_us']:+.2f} |")
    lines += ["", f"Target: overhead < {result['target_overhead_us']:.0f} us."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.calls, args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / f"{STEM}.json", json.dumps(result, indent=1).encode())
    table = markdown(result)
    atomic_write(args.out / f"{STEM}.md", table.encode())
    print(table)
    return result


if __name__ == "__main__":
    main()
