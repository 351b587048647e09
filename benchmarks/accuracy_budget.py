"""Accuracy against the number of layers kept out of INT8, for a trained transformer.

Trains the digits transformer (each 8x8 image read as 8 rows of 8 pixels),
calibrates it (entropy), ranks its quantized units by sensitivity with trtopt's
accuracy-budget analysis, then keeps 0, 1, 2, ... units high in that order and
measures, on held-out digits, the cosine similarity to FP32 and the top-1
accuracy. Also reports how long the analysis took and how long a second
analysis with another budget took (it reads the measurement cache).

    python benchmarks/accuracy_budget.py            # writes benchmarks/results/accuracy_budget.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtopt.bench.digits import DigitsTransformer, load_digits, top1, train  # noqa: E402
from trtopt.calibrators import calibrate  # noqa: E402
from trtopt.profiles import build_profiles  # noqa: E402
from trtopt.export import export  # noqa: E402
from trtopt.files import atomic_write  # noqa: E402
from trtopt.graph import cleanup  # noqa: E402
from trtopt.precision import plan_int8  # noqa: E402
from trtopt.executor.session import run_graph  # noqa: E402
from trtopt.spec import tensor_specs  # noqa: E402
from trtopt.precision.budget import (  # noqa: E402
    AccuracyBudget,
    build_int8,
    find_units_to_keep_high,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    digits = load_digits(args.seed)
    model = train(DigitsTransformer, digits, rows=True, seed=args.seed)
    x_train, x_test = digits.train_x[:, 0], digits.test_x[:, 0]
    profiles = build_profiles({"x": {0: (1, 64, 512)}}, {"x": (64, 8, 8)})
    graph, _ = cleanup(export(model, (x_train[:64],), profiles, opset=19).model)
    specs = tensor_specs(graph.graph.input)
    plan = plan_int8(graph)
    amax = calibrate(
        graph, plan.activation_tensors, list(torch.split(x_train[:256], 64)), input_specs=specs, progress=False
    ).amax
    half = len(x_test) // 2  # first half judges the analysis, second half the curve's accuracy
    validation = [{"x": b.numpy()} for b in torch.split(x_test[:half], 125)]
    evaluation = [{"x": b.numpy()} for b in torch.split(x_test[half:], 125)]
    labels = digits.test_y[half:].numpy()

    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        probe = find_units_to_keep_high(
            graph, amax, validation, None, AccuracyBudget("cosine", 0.0), plan_options={}, cache_dir=cache_dir
        )
        # A budget met only with every unit high makes the search walk the whole ranking.
        walk = AccuracyBudget("cosine", probe.all_units_high - 1e-9)
        report = find_units_to_keep_high(graph, amax, validation, None, walk, plan_options={}, cache_dir=cache_dir)
        first_seconds = time.perf_counter() - start
        start = time.perf_counter()
        again = find_units_to_keep_high(
            graph, amax, validation, None, AccuracyBudget("cosine", 0.9999), plan_options={}, cache_dir=cache_dir
        )
        second_seconds = time.perf_counter() - start

    reference = run_graph(graph, evaluation)
    ranking = [u["unit"] for u in report.units]
    curve = []
    for kept in range(len(ranking) + 1):
        outputs = run_graph(build_int8(graph, amax, {}, ranking[:kept]), evaluation)
        curve.append(
            {
                "units_kept_high": kept,
                "unit_added": ranking[kept - 1] if kept else None,
                "cosine_vs_fp32": AccuracyBudget("cosine", 0.0).evaluate(outputs, reference, None),
                "top1_percent": top1(outputs[0], torch.as_tensor(labels)),
            }
        )
    fp32_top1 = top1(reference[0], torch.as_tensor(labels))
    result = {
        "model": "digits transformer (2 encoder layers, d_model 32)",
        "units": len(ranking),
        "fp32_top1_percent": fp32_top1,
        "analysis_seconds": round(first_seconds, 2),
        "analysis_evaluations": report.evaluations,
        "second_budget_seconds": round(second_seconds, 3),
        "second_budget_evaluations": again.evaluations,
        "second_budget_kept_high": again.kept_high,
        "ranking": report.units,
        "curve": curve,
        "command": "python benchmarks/accuracy_budget.py",
    }
    lines = [
        f"# Accuracy vs units kept high — {result['model']}",
        "",
        f"FP32 top-1 on the evaluation half of the held-out digits: {fp32_top1:.1f}%. "
        f"Analysis: {first_seconds:.1f} s for {report.evaluations} measurements; a second budget "
        f"(cosine >= 0.9999, {len(again.kept_high)} unit(s) kept) took {second_seconds:.2f} s with "
        f"{again.evaluations} new measurements.",
        "",
        "| units kept high | unit added | cosine vs FP32 | top-1 % |",
        "|---:|---|---:|---:|",
    ]
    lines += [
        f"| {c['units_kept_high']} | {c['unit_added'] or '(all INT8)'} | {c['cosine_vs_fp32']:.6f} | {c['top1_percent']:.1f} |"
        for c in curve
    ]
    lines += ["", f"Command: `{result['command']}`"]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "accuracy_budget.json", json.dumps(result, indent=2) + "\n")
    atomic_write(args.out / "accuracy_budget.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
