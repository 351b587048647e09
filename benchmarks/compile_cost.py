"""What a compile costs: peak memory against the number of calibration batches, and FP16/INT8
compile time against FP32 and against onnxruntime's ``quantize_static``.

Memory: a 2-conv model (4x3x32x32 batches, 16-channel activations) compiled at INT8 from a
one-shot generator of 16, 64, 256 and 1024 batches, each in a fresh subprocess; onnxruntime's
``quantize_static`` (MinMax, QDQ) on the same FP32 graph (trtopt's export) and the same batches
next to it. ``peak_rss_mb`` is the child's VmHWM (``/proc/self/status``; ``ru_maxrss`` is
inherited across fork and exec), ``wall_s`` the compile (trtopt: export included) or
``quantize_static`` call.

Time: ResNet-18 (random weights, 4x3x224x224) and a 3-layer BERT-style encoder (384 wide, 6
heads, 16x64 token ids); with ``--models minilm``, pretrained all-MiniLM-L6-v2 on 16 sentences
of 64 tokens with their attention masks (``benchmarks/_minilm.py``). Each is compiled at FP32, FP16 and INT8 (defaults, 8 calibration batches)
in one process, side by side, after one untimed FP32 compile (torch's first export is slower),
interleaved over ``--rounds`` rounds (default 3), medians (totals and each stage); ``quantize_static``
+ its ORT session creation on trtopt's FP32 graph and the same 8 batches, once per round, interleaved
with the compiles. ``int8_vs_quantize_static`` excludes trtopt's export (the FP32 compile's
``export and cleanup`` stage), which ``quantize_static`` does not do. ``int8_as_qs`` is an INT8
compile making ``quantize_static``'s choices (MinMax ranges, no SmoothQuant, an FP32 float part),
so its ratio to ``quantize_static`` compares the same work (plus trtopt's held-back readout).
Each compile's ``stage_seconds`` (``module.spec.info``) is kept.

The export is the same work at every precision but, on a shared machine, its time swings by
2x from one compile to the next, and it is most of an FP32 compile. So next to the plain ratios
of medians, ``*_pooled`` ratios take one export time for every precision (the median over
every compile's export) plus each precision's median time after export: the same quantity,
less at the mercy of one slow export.

``--baseline DIR`` also times a checkout of another trtopt version (its package imported from
``DIR``) in children alternating with this one's, so before/after ratios come from one run.

    PYTHONPATH=. python benchmarks/compile_cost.py   # peak RSS about 1 GB
        # writes benchmarks/results/compile_cost.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH_COUNTS = (16, 64, 256, 1024)
ROUNDS = 3  # compile-time rounds; medians
# The compiles timed: (precision, settings). ``int8_as_qs`` makes quantize_static's choices (MinMax ranges,
# no SmoothQuant, an FP32 float part): the same work as quantize_static, plus the held-back readout.
VARIANTS = {
    "fp32": ("fp32", {}), "fp16": ("fp16", {}), "int8": ("int8", {}),
    "int8_as_qs": ("int8", {"calibrator": "minmax", "smoothquant": None, "int8_float_precision": "fp32"}),
}
MEMORY_SHAPE = (4, 3, 32, 32)


def memory_batch(index: int) -> np.ndarray:
    return np.random.default_rng(1000 + index).standard_normal(MEMORY_SHAPE).astype(np.float32)


def memory_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1)).eval()


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child_memory(tool: str, count: int, graph_path: str) -> dict:
    """One memory measurement (runs in its own process)."""
    start = time.perf_counter()
    if tool == "trtopt":
        import torch

        import trtopt

        batches = (torch.from_numpy(memory_batch(i)) for i in range(count))
        trtopt.compile(memory_model(), (torch.zeros(MEMORY_SHAPE),), precision="int8", calibration_data=batches,
                       backend="onnxruntime", dynamic_shapes={"input": {0: (1, 4, 4)}})
    else:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = ({"input": memory_batch(i)} for i in range(count))

            def get_next(self):
                return next(self.batches, None)

        with tempfile.TemporaryDirectory() as tmp:
            quantize_static(graph_path, str(Path(tmp) / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    return {"tool": tool, "batches": count, "wall_s": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


# ------------------------------------------------------------------ compile time


def encoder_model():
    import torch
    from torch import nn

    class Encoder(nn.Module):
        """BERT-style: token and position embeddings, 3 post-norm layers, a mean-pooled embedding."""

        def __init__(self) -> None:
            super().__init__()
            self.tokens, self.positions = nn.Embedding(1000, 384), nn.Embedding(64, 384)
            layer = nn.TransformerEncoderLayer(384, 6, 1536, dropout=0.0, batch_first=True, activation="gelu")
            self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            return self.encoder(self.tokens(ids) + self.positions(positions)).mean(dim=1)

    torch.manual_seed(0)
    return Encoder().eval()


def time_model(name: str, rounds: int = ROUNDS) -> dict:
    """FP32, FP16, INT8 compiles and quantize_static + session creation, side by side, one process."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    import trtopt

    generator = torch.Generator().manual_seed(1)
    if name == "resnet18":
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet18().eval()
        batches = [(torch.rand(4, 3, 224, 224, generator=generator),) for _ in range(8)]
        shapes: dict = {"x": {0: (1, 4, 8)}}
    elif name == "minilm":  # pretrained, sentences padded to 64 tokens with an attention mask
        import _minilm

        model = _minilm.load_encoder()
        ids, mask = _minilm.tokenize(_minilm.sentences("calibration", 128))
        batches = [(torch.from_numpy(ids[i:i + 16]), torch.from_numpy(mask[i:i + 16])) for i in range(0, 128, 16)]
        shapes = {"input_ids": {0: (1, 16, 32)}, "attention_mask": {0: (1, 16, 32)}}
    else:
        model = encoder_model()
        batches = [(torch.randint(0, 1000, (16, 64), generator=generator),) for _ in range(8)]
        shapes = {"ids": {0: (1, 16, 32)}}
    row: dict = {"model": name, "rounds": rounds}
    # Warm-up: the first export in a process pays torch's one-time costs, which would flatter FP16/INT8.
    graph = trtopt.compile(model, batches[0], backend="onnxruntime", dynamic_shapes=shapes).onnx_model
    input_names = [i.name for i in graph.graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([dict(zip(input_names, (t.numpy() for t in b))) for b in batches])

        def get_next(self):
            return next(self.batches, None)

    runs: dict[str, list[tuple[float, dict]]] = {variant: [] for variant in VARIANTS}
    quantize_static_s = []
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "q.onnx"
        onnx.save(graph, source)
        for _ in range(rounds):  # interleaved, so a burst of load from other jobs hits every variant alike
            for variant, (precision, settings) in VARIANTS.items():
                start = time.perf_counter()
                module = trtopt.compile(model, batches[0], precision=precision, backend="onnxruntime",
                                        dynamic_shapes=shapes, calibration_data=None if precision == "fp32" else batches,
                                        **settings)
                runs[variant].append((time.perf_counter() - start, module.spec.info["stage_seconds"]))
            start = time.perf_counter()
            quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ)
            ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
            quantize_static_s.append(time.perf_counter() - start)
    for precision, measured in runs.items():
        row[f"{precision}_s"] = round(statistics.median(t for t, _ in measured), 2)
        stages = measured[0][1]
        row[f"{precision}_stages"] = {k: round(statistics.median(m[1][k] for m in measured), 2) for k in stages}
        row[f"{precision}_after_export_s"] = round(
            statistics.median(t - m["export and cleanup"] for t, m in measured), 2)
    row["quantize_static_s"] = round(statistics.median(quantize_static_s), 2)
    export = row["fp32_stages"]["export and cleanup"]
    row["fp16_vs_fp32"] = round(row["fp16_s"] / row["fp32_s"], 2)
    row["int8_vs_fp32"] = round(row["int8_s"] / row["fp32_s"], 2)
    # trtopt's own INT8 work (its compile less the FP32 compile's export) against quantize_static + session.
    row["int8_vs_quantize_static"] = round((row["int8_s"] - export) / row["quantize_static_s"], 2)
    # One export time for every precision (see the module docstring).
    pooled = statistics.median(m["export and cleanup"] for measured in runs.values() for _, m in measured)
    row["export_pooled_s"] = round(pooled, 2)
    for precision in ("fp16", "int8"):
        row[f"{precision}_vs_fp32_pooled"] = round(
            (pooled + row[f"{precision}_after_export_s"]) / (pooled + row["fp32_after_export_s"]), 2)
    # The INT8 compile less its own export, against quantize_static + session; and with quantize_static's choices.
    for variant in ("int8", "int8_as_qs"):
        row[f"{variant}_after_export_vs_quantize_static"] = round(
            row[f"{variant}_after_export_s"] / row["quantize_static_s"], 2)
    return row


def run_child(args: list[str], trtopt_root: str | None = None) -> dict:
    """This script in a child process, importing trtopt from ``trtopt_root`` when given."""
    env = None
    if trtopt_root is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([trtopt_root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_rows(rows: list[dict], label: str = "") -> list[str]:
    lines = [
        "| model | FP32 s | FP16 s | INT8 s | quantize_static + session s | FP16/FP32 | INT8/FP32 | "
        "(INT8 - FP32 export)/quantize_static | FP16/FP32 pooled | INT8/FP32 pooled | "
        "(INT8 - its export)/quantize_static | (INT8 as quantize_static - its export)/quantize_static |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']}{label} | {r['fp32_s']:.1f} | {r['fp16_s']:.1f} | {r['int8_s']:.1f} | "
                     f"{r['quantize_static_s']:.1f} | {r['fp16_vs_fp32']:.2f} | {r['int8_vs_fp32']:.2f} | "
                     f"{r['int8_vs_quantize_static']:.2f} | {r['fp16_vs_fp32_pooled']:.2f} | "
                     f"{r['int8_vs_fp32_pooled']:.2f} | {r['int8_after_export_vs_quantize_static']:.2f} | "
                     f"{r['int8_as_qs_after_export_vs_quantize_static']:.2f} |")
    return lines


def table(result: dict) -> str:
    lines = ["# Compile cost", "", f"`{result['command']}`; {result['machine']}", ""]
    if result["memory"]:
        lines += [
            "## Peak memory against calibration batches (INT8, 2-conv model, 4x3x32x32 batches)", "",
            "| batches | trtopt peak RSS MB | trtopt s | quantize_static peak RSS MB | quantize_static s |",
            "|---:|---:|---:|---:|---:|",
        ]
        by = {(r["tool"], r["batches"]): r for r in result["memory"]}
        for count in result["batch_counts"]:
            t, q = by[("trtopt", count)], by[("quantize_static", count)]
            lines.append(f"| {count} | {t['peak_rss_mb']:.0f} | {t['wall_s']:.1f} | {q['peak_rss_mb']:.0f} | "
                         f"{q['wall_s']:.1f} |")
        lines += ["", f"trtopt peak RSS at {result['batch_counts'][-1]} batches / at {result['batch_counts'][0]}: "
                  f"{result['trtopt_rss_ratio']:.2f}x", ""]
    rounds = result["time"][0]["rounds"] if result["time"] else ROUNDS
    lines += [f"## Compile time, side by side in one process (onnxruntime backend, 8 calibration batches, "
              f"median of {rounds} interleaved rounds)", "",
              "Pooled: one export time (the median over every compile's export) for every precision, "
              "plus each precision's median time after export (see the script's docstring).", ""]
    lines += time_rows(result["time"])
    if result.get("baseline_time"):
        lines += ["", f"Before, in the same run (children alternating with the rows above): "
                  f"{result['baseline']}", ""]
        lines += time_rows(result["baseline_time"], " (before)")
    lines += ["", "Stages (seconds, `module.spec.info['stage_seconds']`):", ""]
    for label, rows in (("", result["time"]), (" (before)", result.get("baseline_time") or [])):
        for r in rows:
            for variant in VARIANTS:
                stages = ", ".join(f"{k} {v:.2f}" for k, v in r[f"{variant}_stages"].items())
                lines.append(f"- {r['model']}{label} {variant}: {stages}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child-memory", nargs=3, metavar=("TOOL", "COUNT", "GRAPH"))
    parser.add_argument("--child-time", metavar="MODEL")
    parser.add_argument("--batches", type=int, nargs="*", default=list(BATCH_COUNTS),
                        help="calibration batch counts of the memory part (none: skip it)")
    parser.add_argument("--models", nargs="*", default=["encoder", "resnet18"],
                        choices=["encoder", "resnet18", "minilm"])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--baseline", metavar="DIR", help="another trtopt checkout to time alongside (before/after)")
    parser.add_argument("--baseline-name", default="", help="how the results name the baseline (e.g. its commit)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.child_memory:
        tool, count, graph = args.child_memory
        print(json.dumps(child_memory(tool, int(count), graph)))
        return
    if args.child_time:
        print(json.dumps(time_model(args.child_time, args.rounds)))
        return
    import torch

    import trtopt
    from trtopt.bench.results import write_results

    memory = []
    if args.batches:
        with tempfile.TemporaryDirectory() as tmp:
            graph_path = str(Path(tmp) / "fp32.onnx")
            fp32 = trtopt.compile(memory_model(), (torch.zeros(MEMORY_SHAPE),), backend="onnxruntime",
                                  dynamic_shapes={"input": {0: (1, 4, 4)}})
            fp32.export_onnx(graph_path)
            memory = [run_child(["--child-memory", tool, str(n), graph_path])
                      for n in args.batches for tool in ("trtopt", "quantize_static")]
    times, baseline_times = [], []
    for name in args.models:
        child = ["--child-time", name, "--rounds", str(args.rounds)]
        if args.baseline:  # before, then after, per model: the two see the same stretch of load
            baseline_times.append(run_child(child, args.baseline))
        times.append(run_child(child, str(Path(__file__).resolve().parent.parent)))
    command = "PYTHONPATH=. python benchmarks/compile_cost.py" + "".join(
        f" {flag}" for flag, on in (
            (f"--batches {' '.join(map(str, args.batches))}", args.batches != list(BATCH_COUNTS)),
            (f"--models {' '.join(args.models)}", args.models != ["encoder", "resnet18"]),
            (f"--rounds {args.rounds}", args.rounds != ROUNDS),
            (f"--baseline <checkout of {args.baseline_name or 'the baseline'}>", bool(args.baseline)),
        ) if on)
    peaks = {r["batches"]: r["peak_rss_mb"] for r in memory if r["tool"] == "trtopt"}
    result = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs (ratios only)",
        "batch_counts": args.batches, "memory": memory, "time": times,
        "trtopt_rss_ratio": round(peaks[max(peaks)] / peaks[min(peaks)], 3) if peaks else None,
        "baseline": args.baseline_name or None, "baseline_time": baseline_times,
    }
    write_results(args.out, "compile_cost", result, table(result))


if __name__ == "__main__":
    main()
