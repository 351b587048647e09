"""``BudgetReport``: what the budget search tried and what it reached."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


def _same_values(a: Any, b: Any) -> bool:
    """Equality of JSON-like values where NaN equals NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same_values, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@dataclass
class BudgetReport:
    budget: str
    # ranked: unit (node name, e.g. 'layers.1.linear2/MatMul'), op, module (torch module path, when
    # the graph carries one), kept_high (the metric with it kept high), gain
    units: list[dict[str, Any]] = field(default_factory=list)
    # phase (keep: greedy, prune: back to INT8, final: module as built), unit, before, after, kept_high
    steps: list[dict[str, Any]] = field(default_factory=list)
    all_int8: float = float("nan")
    all_units_high: float = float("nan")
    # Every unit high in the module as built (FP16 float part), when the search needed it.
    all_units_high_final: float = float("nan")
    kept_high: list[str] = field(default_factory=list)
    final: float = float("nan")
    met: bool = False
    evaluations: int = 0  # graphs built and run (the rest came from the cache)
    cached_evaluations: int = 0
    final_evaluations: int = 0  # of all measurements, those of the module as built
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __eq__(self, other: object) -> bool:
        # NaN marks a figure not measured: two reports that both lack it are equal. (The generated
        # __eq__ compared tuples, where the one shared NaN default matched itself by identity up to
        # Python 3.12; 3.13 compares field by field, and a report read back from JSON has its own NaNs.)
        if type(other) is not type(self):
            return NotImplemented
        return _same_values(self.to_json(), other.to_json())

    def table(self) -> str:
        """A readable markdown summary: the ranking, the greedy steps, the result."""
        lines = [
            f"Accuracy budget: {self.budget}",
            f"all units INT8: {self.all_int8:.6g}; every unit high: {self.all_units_high:.6g}; "
            f"final ({len(self.kept_high)} kept high): {self.final:.6g} -> {'met' if self.met else 'NOT met'}",
            "",
            "| rank | unit | op | metric with unit kept high | gain |",
            "|---:|---|---|---:|---:|",
        ]
        lines += [
            f"| {i} | {u['unit']} | {u['op']} | {u['kept_high']:.6g} | {u['gain']:+.3g} |"
            for i, u in enumerate(self.units, 1)
        ]
        if self.steps:
            lines += ["", "| step | phase | unit | before | after | kept high |", "|---:|---|---|---:|---:|---:|"]
            lines += [
                f"| {i} | {s['phase']} | {s['unit']} | {s['before']:.6g} | {s['after']:.6g} | {len(s['kept_high'])} |"
                for i, s in enumerate(self.steps, 1)
            ]
        return "\n".join(lines)
