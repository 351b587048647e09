"""What the accuracy-budget analysis costs on a BERT-base-sized encoder, on a CPU.

12 encoder layers, d_model 768, 12 heads, feed-forward 3072 (random weights), sequence 64,
4 calibration and 2 validation batches of 4. Prints export, calibration and analysis times,
and the time of a second analysis with another budget (served from the measurement cache).

    python benchmarks/budget_cost.py     # writes benchmarks/results/budget_cost.json
"""
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from torch import nn  # noqa: E402

from trtopt.calibrators import calibrate
from trtopt.profiles import build_profiles
from trtopt.export import export
from trtopt.graph import cleanup
from trtopt.precision import plan_int8
from trtopt.precision.budget import AccuracyBudget, find_units_to_keep_high
from trtopt.spec import tensor_specs

from trtopt.files import atomic_write  # noqa: E402


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


logging.basicConfig(level=logging.WARNING)
torch.manual_seed(0)
t0 = time.time()
m = Encoder().eval()
x = torch.randn(4, 64, 768)
profiles = build_profiles({"x": {0: (1, 4, 8)}}, {"x": (4, 64, 768)})
graph, _ = cleanup(export(m, (x,), profiles, opset=19).model)
print("export+cleanup", round(time.time() - t0, 1), "s", flush=True)
specs = tensor_specs(graph.graph.input)
plan = plan_int8(graph)
t = time.time()
amax = calibrate(graph, plan.activation_tensors, [torch.randn(4, 64, 768) for _ in range(4)], input_specs=specs, progress=False).amax
print("calibration", round(time.time() - t, 1), "s;", len(plan.weights), "units", flush=True)
validation = [{"x": torch.randn(4, 64, 768).numpy()} for _ in range(2)]
t = time.time()
with tempfile.TemporaryDirectory() as d:
    r = find_units_to_keep_high(graph, amax, validation, None, AccuracyBudget("cosine", 0.99999), plan_options={}, cache_dir=d)
    first = time.time() - t
    t = time.time()
    r2 = find_units_to_keep_high(graph, amax, validation, None, AccuracyBudget("cosine", 0.9999), plan_options={}, cache_dir=d)
    second = time.time() - t
result = {
    "model": "12-layer encoder, d_model 768, 12 heads, ff 3072 (BERT-base geometry), seq 64",
    "units": len(plan.weights),
    "analysis_seconds": round(first, 1),
    "measurements": r.evaluations,
    "all_int8_cosine": r.all_int8,
    "budget": r.budget,
    "units_kept_high": len(r.kept_high),
    "met": r.met,
    "second_budget_seconds": round(second, 1),
    "second_budget_new_measurements": r2.evaluations,
    "command": "python benchmarks/budget_cost.py",
}
print(json.dumps(result, indent=2))
out = Path(__file__).parent / "results" / "budget_cost.json"
atomic_write(out, json.dumps(result, indent=2) + "\n")
