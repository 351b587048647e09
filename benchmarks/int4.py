"""INT4 weight-only (W4A16) and NVFP4 weights on the CPU: the graph, its accuracy, its size, its speed.

    python benchmarks/int4.py [--modelopt-site DIR] [--out benchmarks/results] [--minilm-only | --decoder-only]

Four measurements, in one run (the machine may be shared: only ratios measured
side by side are reported):

1. **The graph against NVIDIA ModelOpt 0.47's ``rtn_dq``** (``quantize_rtn(...,
   dq_only=True)``) on the same FP16 all-MiniLM-L6-v2 graph: every quantized
   weight's INT4 codes and scales, and the two graphs' outputs. ModelOpt runs in a
   child process from ``--modelopt-site`` (``pip install --no-deps --target DIR
   "nvidia-modelopt==0.47.*"``); its package ``__init__`` imports pynvml, onnxslim
   and lief, which RTN never calls, so the child stubs those, and cppimport, so
   that ModelOpt packs the 4-bit codes with its Python fallback instead of a C++
   extension it would compile.
   Without ``--modelopt-site`` this part is skipped.
2. **all-MiniLM-L6-v2** (pretrained) on 256 unseen sentences: per-sentence cosine
   of the sentence embedding to FP32's (mean and worst) for INT4 RTN and AWQ
   (block 128), NVFP4 and INT8, computed as TensorRT computes the graphs (the
   executor: INT4 dequantised once into FP32 weights, NVFP4 decoded in numpy,
   FP16 tensors rounded); the accuracy readout's warning; bytes of the quantized
   layers' weights against FP32 and the saved module files' sizes.
3. **Two decoder-shaped stacks** of large Linear layers (pre-norm blocks, SwiGLU MLP;
   random weights; written directly in ONNX) at one token per call, batch 1: 3 blocks of
   d_model 1024 (129 MB in FP32; its INT4 weights, 17 MB, fit a 32 MB L3 cache, FP32's do
   not) and 4 blocks of d_model 1536 (378 MB in FP32, 49 MB in INT4: neither fits).
   FP32, INT8, INT4 (ONNX Runtime's MatMulNBits at accuracy levels 4 and 1) and NVFP4
   (decoded: FP32 speed) run on ONE intra-op thread; each round calls every variant once in
   a fresh random order (``--runs`` rounds, default 200), so load from other jobs falls on
   all alike. Reported: medians, the median of each round's own ratio to FP32, the fastest
   call, and p90/p50 (how steady the variant's calls were).
4. **NVFP4's graph structure**: every quantized layer checked against the pattern
   TensorRT takes (``DequantizeLinear(FP8 scales, FP32 scale)`` ->
   ``DequantizeLinear(FP4, ., axis=-1, block_size=16)`` -> Transpose -> Cast -> MatMul).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trtopt  # noqa: E402
from trtopt.executor.session import run_graph  # noqa: E402
from trtopt.bench.results import write_results  # noqa: E402
from trtopt.metrics import sample_cosines  # noqa: E402

COMMAND = "python benchmarks/int4.py --modelopt-site /tmp/mo/site"

# ---------------------------------------------------------------- ModelOpt, in a child process

_MODELOPT_SCRIPT = """
import sys, types
# pynvml, onnxslim, lief: imported by modelopt.onnx's __init__, unused by RTN. cppimport: an empty
# stand-in makes ModelOpt's C++ 4-bit packer fail to build, and ModelOpt falls back to its Python packer.
for name in ("pynvml", "onnxslim", "lief", "cppimport"):
    sys.modules.setdefault(name, types.ModuleType(name))
import onnx
from modelopt.onnx.quantization.gs_patching import patch_gs_modules
from modelopt.onnx.quantization.int4 import quantize_rtn
patch_gs_modules()  # what modelopt.onnx.quantization.quantize() does first (INT4 constants in graphsurgeon)
source, target = sys.argv[1:3]
model = quantize_rtn(onnx.load(source), block_size=128, dq_only=True)
onnx.save(model, target)
"""


def _dq_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """MatMul/Gemm node -> (INT4 codes as int8, scale, axis) of the DequantizeLinear feeding its input 1."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or inits.get(dq.input[0]) is None:
            continue
        if inits[dq.input[0]].data_type != onnx.TensorProto.INT4:
            continue
        codes = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int8)
        scale = numpy_helper.to_array(inits[dq.input[1]])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        found[node.name] = (codes, scale, axis)
    return found


def compare_modelopt(float16_graph: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], site: str) -> dict[str, Any]:
    """trtopt's RTN weights against ModelOpt's rtn_dq on the same FP16 graph."""
    from trtopt.precision.int4 import quantize_weights, weight_units

    units, _ = weight_units(float16_graph, block_size=128)
    ours, _ = quantize_weights(float16_graph, units, fmt="int4", block_size=128)
    with tempfile.TemporaryDirectory(prefix="trtopt-int4-") as tmp:
        source, target = Path(tmp) / "fp16.onnx", Path(tmp) / "modelopt.onnx"
        onnx.save(float16_graph, source)
        env = {**os.environ, "PYTHONPATH": site}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _MODELOPT_SCRIPT, str(source), str(target)], check=True, env=env)
        seconds = time.perf_counter() - start
        theirs = onnx.load(target)
    for entry in theirs.opset_import:  # quantize_rtn alone keeps the source opset; DQ with block_size is 21
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, 21)
    a, b = _dq_weights(ours), _dq_weights(theirs)
    common = sorted(set(a) & set(b))
    codes_equal = all(np.array_equal(a[n][0], b[n][0]) for n in common)
    scales_equal = all(a[n][1].dtype == b[n][1].dtype and np.array_equal(a[n][1], b[n][1]) for n in common)
    axes_equal = all(a[n][2] == b[n][2] for n in common)
    differing = [n for n in common if not np.array_equal(a[n][0], b[n][0])]
    out_a, out_b = run_graph(ours, feeds)[0], run_graph(theirs, feeds)[0]
    cos_a = sample_cosines(out_a, run_graph(float16_graph, feeds)[0])
    cos_b = sample_cosines(out_b, run_graph(float16_graph, feeds)[0])
    return {
        "modelopt": "nvidia-modelopt 0.47 quantize_rtn(block_size=128, dq_only=True)",
        "modelopt_seconds": round(seconds, 1),
        "layers_trtopt": len(a), "layers_modelopt": len(b), "layers_compared": len(common),
        "codes_equal": codes_equal, "scales_equal": scales_equal, "axes_equal": axes_equal,
        "differing_layers": differing[:5],
        "max_abs_output_difference": float(np.abs(out_a - out_b).max()),
        "mean_cosine_trtopt": float(cos_a.mean()), "mean_cosine_modelopt": float(cos_b.mean()),
        "cosine_difference": float(abs(cos_a.mean() - cos_b.mean())),
    }


# ---------------------------------------------------------------- MiniLM


SENTENCES = (
    "calibration (AWQ's search, the FP16 keep-list, INT8's ranges): 256 sentences from the docstrings of the "
    "standard library's even-indexed modules (sorted by name); held back (the readout, AWQ's guard against RTN, "
    "the accuracy budget): 64 more from the same modules; evaluation (the table): 256 sentences from the "
    "odd-indexed modules' docstrings, which no compile sees. 64 tokens, padded, with an attention mask."
)


def minilm(site: str | None) -> dict[str, Any]:
    from int8_accuracy import minilm_task

    from trtopt.precision import to_fp16

    task = minilm_task(0)
    evaluation = [
        {k: v[i : i + 32] for k, v in task.evaluation.items()} for i in range(0, len(task.evaluation["input_ids"]), 32)
    ]
    reference = run_graph(task.graph, evaluation)[0]
    rows: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="trtopt-int4-") as tmp:
        for label, precision, settings in (
            ("fp32", "fp32", {}),
            ("fp16", "fp16", {}),
            ("int8", "int8", {}),
            ("int4 rtn", "int4", {"int4_method": "rtn"}),
            ("int4 awq", "int4", {"int4_method": "awq"}),
            ("nvfp4", "nvfp4", {}),
        ):
            log = io.StringIO()
            handler = logging.StreamHandler(log)
            handler.setLevel(logging.WARNING)
            logging.getLogger("trtopt").addHandler(handler)
            logging.getLogger("trtopt").setLevel(logging.WARNING)  # main() quiets the root logger to ERROR
            start = time.perf_counter()
            module = trtopt.compile(
                task.graph, precision=precision, dynamic_shapes=task.dynamic_shapes, backend="onnxruntime",
                calibration_data=task.calibration if precision != "fp32" else None,
                validation_data=task.validation if precision != "fp32" else None, **settings,
            )
            seconds = time.perf_counter() - start
            logging.getLogger("trtopt").removeHandler(handler)
            cosines = sample_cosines(run_graph(module.onnx_model, evaluation)[0], reference)
            path = Path(tmp) / f"{label.replace(' ', '_')}.trtopt"
            module.save(path)
            sizes[label] = path.stat().st_size
            weight_only = module.precision_report.weight_only or {}
            warning = next((line for line in log.getvalue().splitlines() if "drifts from FP32" in line), None)
            rows.append({
                "precision": label, "compile_s": round(seconds, 1),
                "mean_cosine": float(cosines.mean()), "worst_cosine": float(cosines.min()),
                "readout_cosine": module.precision_report.accuracy.cosine if module.precision_report.accuracy else None,
                "weight_bytes_ratio": weight_only.get("weight_bytes_ratio"),
                "quantized_layers": module.precision_report.quantized_weights,
                "module_file_bytes": sizes[label],
                "readout_warning": warning,
                # AWQ: which calibration rows its search used, per activation (real tokens or all rows)
                "awq_rows": sorted({r["rows"] for r in weight_only.get("awq", [])}) or None,
                "awq_note": weight_only.get("note"),
            })
            if label == "int4 rtn":
                float16 = to_fp16(task.graph, None)[0]
                comparison = compare_modelopt(float16, evaluation[:2], site) if site else None
            del module
    for row in rows:
        row["module_file_vs_fp32"] = round(row["module_file_bytes"] / sizes["fp32"], 3)
    return {"model": "all-MiniLM-L6-v2", "sentences": int(reference.shape[0]), "rows": rows, "modelopt": comparison,
            "data": SENTENCES}


# ---------------------------------------------------------------- decoder-shaped stack


class DecoderBlock(torch.nn.Module):
    """A pre-norm decoder block at one token: attention over itself is its value projection."""

    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.v, self.o = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, d, bias=False)
        self.gate, self.up = torch.nn.Linear(d, ffn, bias=False), torch.nn.Linear(d, ffn, bias=False)
        self.down = torch.nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.o(self.v(self.norm1(x)))
        h = self.norm2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def decoder_graph(d: int, ffn: int, layers: int, seed: int = 0) -> onnx.ModelProto:
    """``DecoderBlock`` x ``layers`` written directly in ONNX (weights N(0, 0.02), [K, N] as the
    exporter writes them): torch's exporter would hold several copies of 200 MB of weights."""
    rng = np.random.default_rng(seed)
    h = onnx.helper
    nodes, inits = [], []

    def weight(name: str, k: int, n: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), name))
        return name

    def add(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(h.make_node(op, inputs, [output], name=f"{output}/{op}", **attrs))
        return output

    inits += [numpy_helper.from_array(np.ones(d, np.float32), "ones"), numpy_helper.from_array(np.zeros(d, np.float32), "zeros")]
    x = "x"
    for i in range(layers):
        p = f"layers.{i}"
        n1 = add("LayerNormalization", [x, "ones", "zeros"], f"{p}.norm1", axis=-1)
        attn = add("MatMul", [add("MatMul", [n1, weight(f"{p}.v.weight", d, d)], f"{p}.v"), weight(f"{p}.o.weight", d, d)], f"{p}.o")
        x = add("Add", [x, attn], f"{p}.residual1")
        n2 = add("LayerNormalization", [x, "ones", "zeros"], f"{p}.norm2", axis=-1)
        gate = add("MatMul", [n2, weight(f"{p}.gate.weight", d, ffn)], f"{p}.gate")
        silu = add("Mul", [gate, add("Sigmoid", [gate], f"{p}.sigmoid")], f"{p}.silu")
        up = add("MatMul", [n2, weight(f"{p}.up.weight", d, ffn)], f"{p}.up")
        down = add("MatMul", [add("Mul", [silu, up], f"{p}.swiglu"), weight(f"{p}.down.weight", ffn, d)], f"{p}.down")
        x = add("Add", [x, down], f"{p}.residual2")
    graph = h.make_graph(
        nodes, "decoder", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, d])],
        [h.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, 1, d])], inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 19)])


DECODER_VARIANTS = (
    ("fp32", "fp32", {}),
    ("int8", "int8", {}),
    ("int4 (MatMulNBits level 4)", "int4", {"int4_cpu_accuracy_level": 4}),
    ("int4 (MatMulNBits level 1)", "int4", {"int4_cpu_accuracy_level": 1}),
    ("nvfp4 (decoded to FP32)", "nvfp4", {}),
)
# (layers, d_model, SwiGLU width): the small stack's INT4 weights (17 MB) fit a 32 MB L3 cache while its
# FP32 weights (129 MB) do not; the large one's INT4 weights (49 MB of 378 MB FP32) do not fit either.
# (4 x 2048/5632, 688 MB FP32, took 12 GB RSS to compile all five variants: too much on a shared machine.)
DECODER_SIZES = {"small": (3, 1024, 2816), "large": (4, 1536, 4096)}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def decoder(runs: int, layers: int, d: int, ffn: int) -> dict[str, Any]:
    """One token, batch 1, ONE intra-op thread, on a possibly shared machine: each round calls
    every variant once, in a fresh random order, so other jobs' load falls on all alike; the
    figures are medians over rounds, the per-round ratio to FP32 (median), and p90/p50 (spread)."""
    from trtopt.backends.onnxruntime import OnnxRuntimeBackend

    graph = decoder_graph(d, ffn, layers)
    params = sum(int(np.prod(t.dims)) for t in graph.graph.initializer if len(t.dims) == 2)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 1, d)).astype(np.float32)
    calibration = [{"x": rng.standard_normal((1, 1, d)).astype(np.float32)} for _ in range(16)]
    reference = run_graph(graph, [{"x": x}])[0].reshape(1, -1)
    # Compiled one at a time and saved, then loaded for timing: only one compilation's working
    # memory is ever alive, and each loaded module holds just its graph and session.
    workdir = Path(tempfile.mkdtemp(prefix="trtopt-int4-decoder-"))
    paths, levels = {}, {}
    for label, precision, settings in DECODER_VARIANTS:
        module = trtopt.compile(
            graph, precision=precision, backend="onnxruntime",
            calibration_data=calibration if precision != "fp32" else None, **settings,
        )
        paths[label] = workdir / f"{len(paths)}.trtopt"
        levels[label] = settings.get("int4_cpu_accuracy_level")
        module.save(paths[label])
        del module
        gc.collect()
    del graph
    modules = {}
    for label, path in paths.items():
        module = trtopt.load(path)
        # One intra-op thread: a 2-core machine shared with other jobs cannot give a session a
        # second core reliably, and thread hand-offs would be timed too.
        module.backend = OnnxRuntimeBackend(module.onnx_model, intra_op_threads=1, emulate_fp16=True,
                                            int4_accuracy_level=levels[label])
        modules[label] = module
    shutil.rmtree(workdir)
    labels = list(modules)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for module in modules.values():
        for _ in range(5):
            module(x)
    order = np.random.default_rng(2)
    for _ in range(runs):
        for label in order.permutation(labels):
            start = time.perf_counter()
            modules[label](x)
            times[label].append(time.perf_counter() - start)
    rows = []
    fp32 = statistics.median(times["fp32"])
    for label, module in modules.items():
        out = np.asarray(module(x)).reshape(1, -1)  # the module as it runs here (MatMulNBits for INT4)
        report = module.precision_report
        median = statistics.median(times[label])
        rows.append({
            "precision": label, "median_ms": round(median * 1e3, 3),
            "vs_fp32": round(median / fp32, 3),
            # Each round's own ratio (calls made back to back), then the median over rounds.
            "paired_vs_fp32": round(statistics.median(t / f for t, f in zip(times[label], times["fp32"])), 3),
            "p90_over_p50": round(_percentile(times[label], 90) / _percentile(times[label], 50), 2),
            "min_ms": round(min(times[label]) * 1e3, 3),
            "min_vs_fp32": round(min(times[label]) / min(times["fp32"]), 3),
            "cosine_vs_fp32": float(sample_cosines(out, reference)[0]),
            "weight_bytes_ratio": (report.weight_only or {}).get("weight_bytes_ratio"),
        })
    return {"model": f"{layers} decoder blocks, d_model {d}, SwiGLU {ffn}, {params / 1e6:.0f} M parameters "
                     f"({params * 4 / 1e6:.0f} MB in FP32), random weights, one token, batch 1",
            "fp32_weight_mb": round(params * 4 / 1e6, 1), "runs": runs, "threads": 1, "rows": rows}


# ---------------------------------------------------------------- NVFP4 structure


def nvfp4_structure() -> dict[str, Any]:
    """Every NVFP4 layer of a small stack checked against TensorRT's pattern, node by node."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(DecoderBlock(256, 512), DecoderBlock(256, 512)).eval()
    module = trtopt.compile(model, (torch.randn(1, 4, 256),), precision="nvfp4", backend="onnxruntime")
    graph = module.onnx_model
    inits = {t.name: t for t in graph.graph.initializer}
    producers = {o: n for n in graph.graph.node for o in n.output}
    checked, problems = 0, []
    for node in graph.graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        chain = []
        tensor = node.input[1]
        while tensor in producers:
            chain.append(producers[tensor])
            tensor = producers[tensor].input[0]
        ops = [n.op_type for n in reversed(chain)]
        dq, scale_dq = chain[-1], producers.get(chain[-1].input[1])
        attrs = {a.name: a.i for a in dq.attribute}
        ok = (
            ops == ["DequantizeLinear", "Transpose", "Cast"]
            and inits[dq.input[0]].data_type == onnx.TensorProto.FLOAT4E2M1
            and attrs.get("axis") == -1 and attrs.get("block_size") == 16
            and scale_dq is not None and scale_dq.op_type == "DequantizeLinear"
            and inits[scale_dq.input[0]].data_type == onnx.TensorProto.FLOAT8E4M3FN
            and inits[scale_dq.input[1]].data_type == onnx.TensorProto.FLOAT and len(inits[scale_dq.input[1]].dims) == 0
            and list(inits[scale_dq.input[0]].dims) == [inits[dq.input[0]].dims[0], inits[dq.input[0]].dims[1] // 16]
        )
        checked += 1
        if not ok:
            problems.append(node.name)
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    return {"layers_checked": checked, "layers_not_matching": problems, "opset": opset}


# ---------------------------------------------------------------- report


def table(result: dict[str, Any]) -> str:
    lines = [
        "# INT4 weight-only and NVFP4 on the CPU backend",
        "",
        f"`{COMMAND}` on {result['machine']} (shared with other jobs: ratios only, measured side by side).",
        "",
    ]
    if result.get("minilm_command"):
        lines += [f"The all-MiniLM-L6-v2 sections were rerun alone later with `{result['minilm_command']}`.", ""]
    mo = result["minilm"].get("modelopt")
    if mo:
        lines += [
            "## RTN graph against ModelOpt 0.47 `rtn_dq` (same FP16 all-MiniLM-L6-v2 graph)",
            "",
            f"{mo['layers_compared']} layers compared (trtopt {mo['layers_trtopt']}, ModelOpt {mo['layers_modelopt']}): "
            f"codes equal **{mo['codes_equal']}**, scales equal **{mo['scales_equal']}**, axes equal {mo['axes_equal']}; "
            f"outputs' max abs difference {mo['max_abs_output_difference']:.3g}, mean cosine to the FP16 graph "
            f"{mo['mean_cosine_trtopt']:.6f} (trtopt) vs {mo['mean_cosine_modelopt']:.6f} (ModelOpt).",
            "",
        ]
    m = result["minilm"]
    lines += [
        f"## {m['model']}, {m['sentences']} unseen sentences, sentence embedding against FP32",
        "",
        "| precision | mean cosine | worst sentence | readout cosine | quantized weight bytes vs FP32 | module file vs FP32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in m["rows"]:
        ratio = "" if r["weight_bytes_ratio"] is None else f"{r['weight_bytes_ratio']:.3f}"
        readout = "" if r["readout_cosine"] is None else f"{r['readout_cosine']:.4f}"
        lines.append(
            f"| {r['precision']} | {r['mean_cosine']:.4f} | {r['worst_cosine']:.4f} | {readout} | {ratio} | "
            f"{r['module_file_vs_fp32']:.3f} ({r['module_file_bytes'] / 1e6:.1f} MB) |"
        )
    if m.get("data"):
        lines += ["", f"Sentences: {m['data']}"]
    for r in m["rows"]:
        if r.get("awq_rows"):
            lines += ["", f"{r['precision']}: the search's calibration rows: {'; '.join(r['awq_rows'])}"
                      + (f"; {r['awq_note']}" if r.get("awq_note") else "") + "."]
    warning = next((r["readout_warning"] for r in m["rows"] if r["precision"] == "int4 rtn"), None)
    if warning:
        lines += ["", f"INT4 RTN's readout warning: `{warning}`"]
    if result.get("decoder_command"):
        lines += ["", f"The decoder sections were rerun alone later with `{result['decoder_command']}`."]
    for d in result.get("decoders", []):  # absent until --decoder-only or a full run writes them
        lines += [
            "",
            f"## {d['model']}",
            "",
            f"{d['runs']} rounds, {d['threads']} intra-op thread; each round calls every variant once in a random "
            "order. vs FP32: ratio of the medians; paired: median over rounds of each round's own ratio; "
            "p90/p50: the spread of the variant's calls (1.0 = steady).",
            "",
            "| precision | median ms | vs FP32 | paired vs FP32 | p90/p50 | fastest call ms | vs FP32 | cosine to FP32 "
            "| quantized weight bytes vs FP32 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            ratio = "" if r["weight_bytes_ratio"] is None else f"{r['weight_bytes_ratio']:.3f}"
            lines.append(
                f"| {r['precision']} | {r['median_ms']:.2f} | {r['vs_fp32']:.2f}x | {r['paired_vs_fp32']:.2f}x | "
                f"{r['p90_over_p50']:.2f} | {r['min_ms']:.2f} | {r['min_vs_fp32']:.2f}x | {r['cosine_vs_fp32']:.4f} "
                f"| {ratio} |"
            )
    s = result["nvfp4_structure"]
    lines += [
        "",
        f"NVFP4 graph structure: {s['layers_checked']} layers checked against DQ(FP8 block scales, FP32 scale) -> "
        f"DQ(FP4, axis=-1, block_size=16) -> Transpose -> Cast -> MatMul, opset {s['opset']}; "
        f"not matching: {s['layers_not_matching'] or 'none'}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modelopt-site", help="a --target directory holding nvidia-modelopt 0.47 (no deps)")
    parser.add_argument("--runs", type=int, default=200, help="timed rounds per decoder (default 200)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--minilm-only", action="store_true",
                      help="rerun only the all-MiniLM-L6-v2 part; the other sections stay as in OUT/int4.json")
    only.add_argument("--decoder-only", action="store_true",
                      help="rerun only the decoder stacks; the other sections stay as in OUT/int4.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.minilm_only or args.decoder_only:
        result = json.loads((Path(args.out) / "int4.json").read_text())
        if args.minilm_only:
            result["minilm"] = minilm(args.modelopt_site)
            result["minilm_command"] = "python benchmarks/int4.py --minilm-only" + (
                f" --modelopt-site {args.modelopt_site}" if args.modelopt_site else "")
        else:
            result.pop("decoder", None)  # the single stack of earlier runs, before "decoders"
            result["decoders"] = [decoder(args.runs, *size) for size in DECODER_SIZES.values()]
            result["decoder_command"] = f"python benchmarks/int4.py --decoder-only --runs {args.runs}"
        write_results(args.out, "int4", result, table(result))
        return
    result = {
        "command": COMMAND,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}",
        "nvfp4_structure": nvfp4_structure(),
        "decoders": [decoder(args.runs, *size) for size in DECODER_SIZES.values()],
        "minilm": minilm(args.modelopt_site),
    }
    write_results(args.out, "int4", result, table(result))


if __name__ == "__main__":
    main()
