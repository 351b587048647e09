"""``AccuracyBudget``: the metric a budget names, its bound, and how it is measured batch by batch."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError
from ...metrics import Comparison, Outputs, compare_batches

UserMetric = Callable[[Outputs, Outputs], float]
# Outputs batch by batch: one list of arrays (one per model output) per validation batch.
BatchOutputs = Iterable[Outputs]


# The budget's metric names -> (what it reads from a metrics.Comparison, higher is better). The
# names are what users write ("cosine>=0.99"); the methods' names say what each computes.
METRICS: dict[str, tuple[Callable[[Comparison], float], bool]] = {
    "cosine": (Comparison.mean_sample_cosine, True),
    "top1": (Comparison.argmax_agreement, True),
    "accuracy": (Comparison.label_accuracy, True),
    "max_abs": (Comparison.max_abs_error, False),
    "mean_abs": (Comparison.worst_mean_abs_error, False),
    "accuracy_drop": (lambda c: c.reference_accuracy() - c.label_accuracy(), False),
}


@dataclass(frozen=True)
class AccuracyBudget:
    """How much accuracy INT8 may cost: ``metric`` must reach ``bound``.

    ``metric`` is a built-in name (see ``METRICS``: cosine, top1, accuracy,
    max_abs, mean_abs, accuracy_drop) or a callable ``metric(outputs, reference)
    -> float`` over lists of output arrays (then say ``higher_is_better``).
    ``best_effort=True`` returns the closest result when the budget cannot be met
    instead of raising ``AccuracyBudgetError``.
    """

    metric: str | UserMetric
    bound: float
    higher_is_better: bool = True
    best_effort: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.metric, str):
            if self.metric not in METRICS:
                raise ConfigError(
                    f"unknown accuracy metric {self.metric!r}; use one of {', '.join(METRICS)} or a "
                    "callable metric(outputs, reference) -> float"
                )
            object.__setattr__(self, "higher_is_better", METRICS[self.metric][1])
        elif not callable(self.metric):
            raise ConfigError(f"accuracy metric {self.metric!r} is neither a name nor a callable")
        if not isinstance(self.bound, (int, float)) or not math.isfinite(self.bound):
            raise ConfigError(f"accuracy bound {self.bound!r} must be a finite number")

    @classmethod
    def parse(cls, text: str, best_effort: bool = False) -> AccuracyBudget:
        """``"cosine>=0.99"``, ``"top1>=0.995"``, ``"max_abs<=0.05"``, ``"accuracy_drop<=0.002"``."""
        match = re.fullmatch(r"\s*(\w+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
        if not match:
            raise ConfigError(
                f"accuracy budget {text!r} is not of the form METRIC>=BOUND or METRIC<=BOUND, e.g. "
                "'cosine>=0.99' or 'accuracy_drop<=0.002'"
            )
        name, op, bound = match.groups()
        try:
            value = float(bound)
        except ValueError:
            raise ConfigError(
                f"accuracy budget {text!r}: {bound!r} is not a number; write e.g. 'cosine>=0.99'"
            ) from None
        budget = cls(name, value, best_effort=best_effort)
        if (op == ">=") != budget.higher_is_better:
            raise ConfigError(
                f"{name} is {'higher' if budget.higher_is_better else 'lower'}-is-better; write "
                f"{name}{'>=' if budget.higher_is_better else '<='}{bound}"
            )
        return budget

    @property
    def name(self) -> str:
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__qualname__", "metric")

    def evaluate(self, outputs: Outputs, reference: Outputs, labels: np.ndarray | None) -> float:
        """The metric of ``outputs`` against ``reference`` (lists of arrays, one per model output)."""
        return self.evaluate_batches([outputs], [reference], labels)

    def evaluate_batches(self, outputs: BatchOutputs, reference: BatchOutputs, labels: np.ndarray | None) -> float:
        """The metric over batches, each compared as it comes (shapes may differ from batch to batch).

        A callable metric sees every batch at once: its outputs are concatenated along
        axis 0, which batches of different shapes do not allow (that is a ConfigError).
        """
        if isinstance(self.metric, str):
            return float(METRICS[self.metric][0](compare_batches(zip(outputs, reference), labels)))
        pairs = list(zip(outputs, reference))
        try:
            joined = [
                [np.concatenate([np.atleast_1d(batch[k]) for batch in side]) for k in range(len(side[0]))]
                for side in ([o for o, _ in pairs], [r for _, r in pairs])
            ] if len(pairs) > 1 else [list(pairs[0][0]), list(pairs[0][1])]
        except ValueError as exc:
            raise ConfigError(
                f"the accuracy metric {self.name} takes every validation output at once, but the batches' "
                f"outputs differ in shape ({exc}); use a built-in metric (they compare batch by batch), "
                "or give validation_data whose batches share one shape"
            ) from None
        return float(self.metric(*joined))

    def met(self, value: float) -> bool:
        return value >= self.bound if self.higher_is_better else value <= self.bound

    def gain(self, value: float, baseline: float) -> float:
        """How much better ``value`` is than ``baseline`` (positive = better)."""
        return value - baseline if self.higher_is_better else baseline - value

    def describe(self) -> str:
        return f"{self.name} {'>=' if self.higher_is_better else '<='} {self.bound:g}"
