"""Accuracy-budgeted mixed precision: find the units INT8 hurts, keep only those high.

A *unit* is one weighted op (Conv, ConvTranspose, Gemm, MatMul) with the Q/DQ
pairs on its inputs. The search (``search``), all on ONNX Runtime:

1. measure the metric with every unit quantized, and with none (the ceiling);
2. for each unit, the metric with that unit alone left in float: its gain;
3. keep units in float, most helpful first, re-measuring the whole model after
   each, until the budget holds; then prune the kept units the others make
   unnecessary;
4. measure the module as really built (FP16 float part) and keep more units
   while it misses, so the search ends met, or with every unit high.

Ranges come from one calibration of the full plan (a smaller plan's
activations are a subset), so no step recalibrates. Steps 1-3 measure INT8's
error alone, with an FP32 float part, through one graph whose units each sit
behind a switch input (``SwitchedInt8``): one session serves every measurement.
Every measurement is cached on disk, keyed by the graph, the ranges, the
validation data and the metric (and the float part, for the module as built),
so a second run with another budget re-measures only what it has not seen.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import onnx

from ...errors import AccuracyBudgetError
from ...executor.session import run_batches
from ...names import node_modules
from .cache import MeasurementCache, analysis_key, default_cache_dir
from .metric import AccuracyBudget, BatchOutputs
from .report import BudgetReport
from .rewrite import SwitchedInt8, quantized_units

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------ search


@dataclass(frozen=True)
class FinalModule:
    """How the module is really built, when its float part is not the analysis's FP32.

    ``build(kept_high)`` returns that graph; ``tag`` (e.g. ``"fp16 threshold=16384"``)
    keys its measurements in the cache.
    """

    tag: str
    build: Callable[[frozenset[str]], onnx.ModelProto]


# What the analysis's ``build`` returns and ``run`` takes besides a graph: find_units_to_keep_high
# passes the kept set itself (one switched graph runs every assignment); the final module is a graph.
_Built = TypeVar("_Built")


class _Search(Generic[_Built]):
    """One budget search: measurements (cached), the report, and the phases of ``search``."""

    def __init__(self, units: Mapping[str, str], build: Callable[[frozenset[str]], _Built],
                 run: Callable[[_Built | onnx.ModelProto], BatchOutputs], reference: BatchOutputs,
                 labels: np.ndarray | None, budget: AccuracyBudget, cache: MeasurementCache,
                 final: FinalModule | None, modules: Mapping[str, str] | None = None) -> None:
        self.units, self.build, self.run, self.reference = units, build, run, reference
        self.modules = modules or {}
        self.labels, self.budget, self.cache, self.final = labels, budget, cache, final
        self.report = BudgetReport(budget=budget.describe())

    def _measure(self, kept: frozenset[str], tag: str, build: Callable[[frozenset[str]], _Built | onnx.ModelProto]) -> float:
        cached = self.cache.get(kept, tag)
        if cached is not None:
            self.report.cached_evaluations += 1
            return cached
        value = self.budget.evaluate_batches(self.run(build(kept)), self.reference, self.labels)
        self.report.evaluations += 1
        self.cache.put(kept, value, tag)
        return value

    def analysis(self, kept: frozenset[str]) -> float:
        """The metric with ``kept`` in float and the rest INT8, the float part FP32."""
        return self._measure(kept, "", self.build)

    def module(self, kept: frozenset[str]) -> float:
        """The metric of the module as built (its configured float precision)."""
        if self.final is None:
            return self.analysis(kept)
        self.report.final_evaluations += 1
        return self._measure(kept, self.final.tag, self.final.build)

    def step(self, phase: str, unit: str, before: float, after: float, kept: Iterable[str]) -> None:
        self.report.steps.append(
            {"phase": phase, "unit": unit, "before": before, "after": after, "kept_high": list(kept)}
        )
        logger.info("%s %s: %.6g -> %.6g (%d kept)", phase, unit, before, after, len(self.report.steps[-1]["kept_high"]))

    def rank(self) -> list[str]:
        """Units by the gain of keeping each alone in float, most helpful first."""
        if not self.report.units:
            ranked = []
            for index, (unit, op) in enumerate(self.units.items(), 1):
                value = self.analysis(frozenset([unit]))
                entry: dict[str, Any] = {"unit": unit, "op": op, "kept_high": value, "gain": self.budget.gain(value, self.report.all_int8)}
                if unit in self.modules:
                    entry["module"] = self.modules[unit]
                ranked.append(entry)
                logger.info("sensitivity %d/%d: %s (%s) kept high -> %.6g", index, len(self.units), unit, op, value)
            # Stable on ties: graph order breaks them, so every budget sees the same ranking.
            ranked.sort(key=operator.itemgetter("gain"), reverse=True)
            self.report.units = ranked
        return [u["unit"] for u in self.report.units]

    def greedy(self, order: Sequence[str]) -> list[str]:
        """Keep units high in ``order`` until the analysis metric meets the budget."""
        kept: list[str] = []
        current = self.report.all_int8
        for unit in order:
            kept.append(unit)
            value = self.analysis(frozenset(kept))
            self.step("keep", unit, current, value, kept)
            current = value
            if self.budget.met(value):
                break
        return kept

    def prune(self, kept: list[str]) -> list[str]:
        """Return units to INT8, least helpful first, while the analysis metric still meets the budget.

        The greedy order follows each unit's gain alone; together some of them
        overlap, and one kept early may be unnecessary once later ones are in.
        """
        current = self.analysis(frozenset(kept))
        for unit in reversed(list(kept)):
            if len(kept) == 1:
                break
            trial = [u for u in kept if u != unit]
            value = self.analysis(frozenset(trial))
            if self.budget.met(value):
                self.step("prune", unit, current, value, trial)
                kept, current = trial, value
        return kept

    def extend(self, kept: list[str], order: Sequence[str]) -> tuple[list[str], float]:
        """Keep more units, in ``order``, until the module as built meets the budget.

        The float part of the real module (FP16) adds its own error to INT8's,
        so a set that meets the budget in the analysis can miss it. Every unit
        high is tried first (when even that misses, no set can meet it); then a
        bisection finds the shortest prefix of the remaining units that meets it,
        in a handful of builds instead of one per unit.
        """
        rest = [u for u in order if u not in kept]
        everything = kept + rest
        ceiling = self.module(frozenset(everything))
        self.report.all_units_high_final = ceiling
        self.step("final", "(every unit high)", self.report.final, ceiling, everything)
        if not self.budget.met(ceiling) or not rest:
            return everything, ceiling
        low, high, best = 0, len(rest), ceiling  # invariant: kept + rest[:high] meets the budget
        while high - low > 1:
            middle = (low + high) // 2
            value = self.module(frozenset(kept + rest[:middle]))
            self.step("final", rest[middle - 1], self.report.final, value, kept + rest[:middle])
            if self.budget.met(value):
                high, best = middle, value
            else:
                low = middle
        return kept + rest[:high], best


def search(
    *,
    units: Mapping[str, str],
    build: Callable[[frozenset[str]], _Built],
    run: Callable[[_Built | onnx.ModelProto], BatchOutputs],
    reference: BatchOutputs,
    labels: np.ndarray | None,
    budget: AccuracyBudget,
    cache: MeasurementCache,
    final: FinalModule | None = None,
    modules: Mapping[str, str] | None = None,
) -> BudgetReport:
    """Rank ``units`` (name -> op type) by sensitivity and keep few high so that ``budget`` holds.

    ``modules`` (unit -> torch module path) goes into the ranking's records.

    ``build(kept_high)`` returns the INT8 graph with those units left in float
    and an FP32 float part (INT8's error alone); ``run(graph)`` its outputs on
    the validation data, batch by batch (``reference`` likewise: re-iterable). ``final`` builds the module as
    it will really be (FP16 float part); without it the analysis graph is final.

    The order: every unit INT8 and every unit high; each unit's gain alone;
    keep units high greedily by gain until the analysis meets the budget; prune
    those whose return to INT8 still meets it; then measure the module as built
    and, while it misses, keep more (``_Search.extend``). So the search ends
    either with the final module meeting the budget, or with every unit high
    and ``met`` False. Every measurement is cached by set (and float part), so a
    second budget on the same cache measures only what the first did not.
    """
    start = time.perf_counter()
    s = _Search(units, build, run, reference, labels, budget, cache, final, modules)
    report = s.report
    everything = list(units)
    report.all_int8 = s.analysis(frozenset())
    report.all_units_high = s.analysis(frozenset(everything))
    logger.info(
        "accuracy budget %s: all %d units INT8 -> %.6g, none -> %.6g",
        budget.describe(), len(units), report.all_int8, report.all_units_high,
    )
    if budget.met(report.all_int8):
        kept: list[str] = []
    elif not budget.met(report.all_units_high):
        kept = everything  # even the float graph misses (a task metric, say): nothing to search
    else:
        order = s.rank()
        kept = s.prune(s.greedy(order))
    report.final = s.module(frozenset(kept))
    if not budget.met(report.final) and len(kept) < len(everything):
        logger.info(
            "accuracy budget %s: the module as built reaches %.6g with %d unit(s) kept high; keeping more",
            budget.describe(), report.final, len(kept),
        )
        kept, report.final = s.extend(kept, s.rank() if len(units) > 1 else everything)
    if len(kept) == len(everything):
        report.all_units_high_final = report.final
    report.kept_high = kept
    report.met = budget.met(report.final)
    report.seconds = time.perf_counter() - start
    return report


# ------------------------------------------------------------ data and driver

def find_units_to_keep_high(
    model: onnx.ModelProto,
    amax: Mapping[str, float],
    validation: Iterable[Mapping[str, np.ndarray]],
    labels: np.ndarray | None,
    budget: AccuracyBudget,
    *,
    plan_options: Mapping[str, Any],
    cache_dir: str | os.PathLike[str] | None,
    reference: BatchOutputs | None = None,
    final: FinalModule | None = None,
) -> BudgetReport:
    """Drive ``search`` on ONNX Runtime for an FP32 ``model`` with calibrated ``amax``.

    ``validation`` is re-iterable (a list of feeds, or ``calibrators.data.Batches``,
    read batch by batch). ``plan_options`` are ``plan_int8``'s keywords (the user's
    exclusions); a unit kept high loses its Q/DQ from that plan (``keep_high``).
    ``reference`` is ``model``'s own outputs on ``validation``, batch by batch
    (re-iterable), when the caller has them already.
    ``final`` builds the module as it will really be (see ``search``).
    """
    units = quantized_units(model, plan_options)
    switched = SwitchedInt8(model, amax, plan_options, units)

    def build(kept: frozenset[str]) -> frozenset[str]:
        return kept  # one switched graph serves every assignment: nothing to build

    def run(graph: onnx.ModelProto | frozenset[str]) -> BatchOutputs:
        if isinstance(graph, frozenset):
            return switched.run(graph, validation)
        return run_batches(graph, validation)  # the final module, or the FP32 model

    if reference is None:
        reference = list(run(model))
    cache = MeasurementCache(
        cache_dir or default_cache_dir(), analysis_key(model, amax, validation, labels, budget, plan_options)
    )
    return search(
        units=units, build=build, run=run, reference=reference, labels=labels, budget=budget, cache=cache,
        final=final, modules=node_modules(model),
    )


def check_final(
    report: BudgetReport,
    final_graph: onnx.ModelProto,
    reference: BatchOutputs,
    validation: Iterable[Mapping[str, np.ndarray]],
    labels: np.ndarray | None,
    budget: AccuracyBudget,
    value: float | None = None,
    precision: str = "int8",
) -> None:
    """Hold the module as built (with its FP16 float part) to the budget.

    ``value`` is its metric when the search measured this very graph already;
    otherwise it is run against the FP32 ``reference`` outputs here. Raises
    AccuracyBudgetError when it misses, unless the budget is best-effort.
    """
    if value is None:
        value = budget.evaluate_batches(run_batches(final_graph, validation), reference, labels)
    report.final, report.met = value, budget.met(value)
    logger.info(
        "accuracy budget %s: final module %.6g with %d unit(s) kept high -> %s",
        budget.describe(), value, len(report.kept_high), "met" if report.met else "NOT met",
    )
    if not report.met and not budget.best_effort:
        ceiling = report.all_units_high_final if not math.isnan(report.all_units_high_final) else report.all_units_high
        said = f"; with every unit kept high it is {ceiling:.6g}" if not math.isnan(ceiling) else ""
        raise AccuracyBudgetError(
            f"{precision.upper()} cannot meet the accuracy budget {budget.describe()}: the best module reaches "
            f"{value:.6g} with {len(report.kept_high)} of {len(report.units) or len(report.kept_high)} "
            f"unit(s) kept high{said}. Loosen the budget, use precision='fp16', or pass "
            "AccuracyBudget(..., best_effort=True) to get the closest module",
            report,
        )
