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

import hashlib
import json
import logging
import math
import operator
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..files import atomic_write
from .._version import __version__
from ..backends.onnxruntime import cpu_session, run_batches
from ..calibrators.data import split_validation  # noqa: F401 - the split the budget is judged on
from ..errors import AccuracyBudgetError, ConfigError, TrtoptError
from ..metrics import Comparison, Outputs, compare_batches

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------- report


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


# ------------------------------------------------------------------ search


def _digest_arrays(parts: Iterable[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in parts:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class MeasurementCache:
    """Metric values by set of units kept high, persisted as one JSON file per analysis key.

    ``tag`` separates measurements of differently built modules over the same
    units (the analysis's FP32 float part has none; the final module's names
    its float precision), so both live in one file and serve every budget.
    """

    def __init__(self, directory: str | os.PathLike[str] | None, key: str) -> None:
        self.path = Path(directory) / f"{key}.json" if directory else None
        self.values: dict[str, float] = {}
        if self.path and self.path.is_file():
            try:
                self.values = {k: float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, OSError, AttributeError) as exc:
                logger.warning("ignoring unreadable sensitivity cache %s (%s)", self.path, exc)

    @staticmethod
    def _key(kept: frozenset[str], tag: str) -> str:
        names = "\n".join(sorted(kept))
        return f"{tag}|{names}" if tag else names

    def get(self, kept: frozenset[str], tag: str = "") -> float | None:
        return self.values.get(self._key(kept, tag))

    def put(self, kept: frozenset[str], value: float, tag: str = "") -> None:
        self.values[self._key(kept, tag)] = value
        if self.path:
            atomic_write(self.path, json.dumps(self.values, indent=0))


@dataclass(frozen=True)
class FinalModule:
    """How the module is really built, when its float part is not the analysis's FP32.

    ``build(kept_high)`` returns that graph; ``tag`` (e.g. ``"fp16 threshold=16384"``)
    keys its measurements in the cache.
    """

    tag: str
    build: Callable[[frozenset[str]], onnx.ModelProto]


class _Search:
    """One budget search: measurements (cached), the report, and the phases of ``search``."""

    def __init__(self, units: Mapping[str, str], build: Callable[[frozenset[str]], onnx.ModelProto],
                 run: Callable[[onnx.ModelProto], BatchOutputs], reference: BatchOutputs,
                 labels: np.ndarray | None, budget: AccuracyBudget, cache: MeasurementCache,
                 final: FinalModule | None, modules: Mapping[str, str] | None = None) -> None:
        self.units, self.build, self.run, self.reference = units, build, run, reference
        self.modules = modules or {}
        self.labels, self.budget, self.cache, self.final = labels, budget, cache, final
        self.report = BudgetReport(budget=budget.describe())

    def _measure(self, kept: frozenset[str], tag: str, build: Callable[[frozenset[str]], onnx.ModelProto]) -> float:
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
                entry = {"unit": unit, "op": op, "kept_high": value, "gain": self.budget.gain(value, self.report.all_int8)}
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
    build: Callable[[frozenset[str]], onnx.ModelProto],
    run: Callable[[onnx.ModelProto], BatchOutputs],
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


def analysis_key(
    model: onnx.ModelProto,
    amax: Mapping[str, float],
    validation: Iterable[Mapping[str, np.ndarray]],
    labels: np.ndarray | None,
    budget: AccuracyBudget,
    plan_options: Mapping[str, Any],
) -> str:
    h = hashlib.sha256()
    h.update(model.SerializeToString(deterministic=True))
    h.update(json.dumps(sorted(amax.items())).encode())
    h.update(_digest_arrays(a for feed in validation for _, a in sorted(feed.items())).encode())
    if labels is not None:
        h.update(_digest_arrays([labels]).encode())
    h.update(__version__.encode())  # the quantization code itself may change what a unit costs
    if isinstance(budget.metric, str):
        h.update(budget.metric.encode())
    else:  # a callable: its code, so two lambdas or an edited function never share results
        code = getattr(budget.metric, "__code__", None)
        h.update(budget.name.encode() + (code.co_code + repr(code.co_consts).encode() if code else b""))
    h.update(json.dumps(plan_options, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


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
    from ..names import node_modules

    return search(
        units=units, build=build, run=run, reference=reference, labels=labels, budget=budget, cache=cache,
        final=final, modules=node_modules(model),
    )


class SwitchedInt8:
    """Every unit's Q/DQ in one graph, each unit behind a switch: one session for the whole analysis.

    Building an INT8 graph (plan, insert Q/DQ, shape inference, checker) and
    an ONNX Runtime session for it took about 85% of each measurement on a
    6-layer BERT; the search makes one per assignment of units. Here each unit
    becomes ``If(keep_high_k)``, where ``keep_high_k`` is a boolean scalar graph
    input: its then-branch is the op on its float inputs, its else-branch the op
    on its Q/DQ outputs, so an assignment is a feed, not a graph. The outputs
    equal ``build_int8``'s graph for the same set: keeping a unit high there
    removes exactly those Q/DQ uses (``keep_high``). Only the branch taken runs,
    and each branch reads its weight where it lies; a ``Where`` between the two
    weights instead copied every weight on every run (two BERT-base layers: 105
    ms a run against 62 ms). The graph and session are made on the first
    ``run``, so a fully cached search builds nothing.
    """

    def __init__(
        self, model: onnx.ModelProto, amax: Mapping[str, float], plan_options: Mapping[str, Any],
        units: Mapping[str, str],
    ) -> None:
        self.model, self.amax, self.plan_options, self.units = model, amax, plan_options, list(units)
        self._session: Any = None
        self.switches: dict[str, str] = {}  # unit -> its switch input

    def graph(self) -> onnx.ModelProto:
        """The INT8 graph of every unit, with a switch input per unit (True: keep it high)."""
        graph = build_int8(self.model, self.amax, self.plan_options, frozenset())
        original = {node.name: list(node.input) for node in self.model.graph.node}
        weights = {init.name: init for init in self.model.graph.initializer}
        present = {init.name for init in graph.graph.initializer}
        switches: dict[str, str] = {}
        nodes = []
        for node in graph.graph.node:
            if node.name not in original or node.name not in self.units:
                nodes.append(node)
                continue
            switch = switches[node.name] = f"trtopt_keep_high_{len(switches)}"
            for name in original[node.name]:
                if name in weights and name not in present:
                    graph.graph.initializer.append(weights[name])  # the float weight, for the high branch
                    present.add(name)
            nodes.append(onnx.helper.make_node(
                "If", [switch], list(node.output), name=f"{node.name}__switch",
                then_branch=_branch(node, original[node.name], "high"),
                else_branch=_branch(node, list(node.input), "int8"),
            ))
            graph.graph.input.append(onnx.helper.make_tensor_value_info(switch, onnx.TensorProto.BOOL, []))
        del graph.graph.node[:]
        graph.graph.node.extend(nodes)
        missing = set(self.units) - set(switches)
        if missing:
            raise TrtoptError(f"internal: units {sorted(missing)[:3]} not found in their INT8 graph")
        self.switches = switches
        return graph

    def run(self, kept: frozenset[str], validation: Iterable[Mapping[str, np.ndarray]]) -> BatchOutputs:
        """Outputs on ``validation``, batch by batch, with the units in ``kept`` in float and the rest INT8."""
        if self._session is None:
            self._session = cpu_session(self.graph())
        unknown = kept - set(self.switches)
        if unknown:
            raise ConfigError(f"units {sorted(unknown)[:3]} are not quantized units of this graph")
        switches = {s: np.array(unit in kept) for unit, s in self.switches.items()}
        names = [o.name for o in self._session.get_outputs()]
        return (self._session.run(names, {**feed, **switches}) for feed in validation)


def _branch(node: onnx.NodeProto, inputs: list[str], tag: str) -> onnx.GraphProto:
    """A one-node graph computing ``node`` on ``inputs``, which it reads from the enclosing graph."""
    op = onnx.NodeProto()
    op.CopyFrom(node)
    op.name = f"{node.name}__{tag}"
    del op.input[:]
    op.input.extend(inputs)
    outputs = [f"{name}__{tag}" for name in node.output]
    del op.output[:]
    op.output.extend(outputs)
    return onnx.helper.make_graph(
        [op], op.name, [], [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs]
    )


def quantized_units(model: onnx.ModelProto, plan_options: Mapping[str, Any]) -> dict[str, str]:
    """The weighted ops ``plan_int8`` quantizes (name -> op type), in graph order."""
    from .int8 import plan_int8

    quantized = {name for name, _, _ in plan_int8(model, **plan_options).weights}
    return {node.name: node.op_type for node in model.graph.node if node.name in quantized}


def keep_high(plan: Any, kept: Iterable[str], ops: Mapping[str, str], modules: Mapping[str, str] | None = None) -> Any:
    """``plan`` without the Q/DQ inputs of the units in ``kept``.

    Removing uses from the full plan (instead of planning again with more
    exclusions) keeps every remaining Q/DQ where it was, so the ranges of the one
    calibration of the full plan cover every assignment the search tries.
    """
    import dataclasses

    from .fp16 import KeptNode

    kept = set(kept)
    activations = {}
    for tensor, uses in plan.activations.items():
        remaining = [(node, index) for node, index in uses if node not in kept]
        if remaining:
            activations[tensor] = remaining
    return dataclasses.replace(  # keeps the plan's quantization format (INT8 or FP8)
        plan,
        activations=activations,
        weights=[w for w in plan.weights if w[0] not in kept],
        skipped=list(plan.skipped)
        + [
            KeptNode(name, ops.get(name, ""), "kept high by the accuracy budget", (modules or {}).get(name))
            for name in sorted(kept)
        ],
    )


def build_int8(
    model: onnx.ModelProto, amax: Mapping[str, float], plan_options: Mapping[str, Any], kept: Iterable[str]
) -> onnx.ModelProto:
    """The INT8 graph with the units in ``kept`` left in float (FP32 float part, for the analysis)."""
    from .int8 import FP32_SCALE_FLOOR, plan_int8, quantize_int8

    ops = {node.name: node.op_type for node in model.graph.node}
    plan = keep_high(plan_int8(model, **plan_options), kept, ops)
    return quantize_int8(model, plan, amax, scale_floor=FP32_SCALE_FLOOR)[0]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trtopt" / "sensitivity"


def check_final(
    report: BudgetReport,
    final_graph: onnx.ModelProto,
    reference: BatchOutputs,
    validation: Iterable[Mapping[str, np.ndarray]],
    labels: np.ndarray | None,
    budget: AccuracyBudget,
    value: float | None = None, precision: str = "int8",
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
