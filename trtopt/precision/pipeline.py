"""``apply_precision``: write the requested precision into the graph (TensorRT 11 reads it only from there).

The steps, in order: a graph that carries its precision already is built as it
is; FP32 changes nothing; otherwise the data is split (calibration, and held-back
batches that judge the module), then the FP16 path (keep-list, readout) or the
INT8/FP8 path (plan, calibration, SmoothQuant, accuracy-budget search, Q/DQ,
report, final check, readout). The result is the graph and a ``PrecisionReport``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ..calibrators import calibrate, check_ranges
from ..calibrators.data import Batches, Spool, batches_to_read, open_batches, split_validation
from ..config import BuildConfig, CalibratorKind, Precision
from ..errors import ConfigError
from ..executor.fp16_emulation import widen_to_fp32
from ..executor.session import run_batches
from ..names import node_modules
from ..spec import tensor_specs
from ..stages import StageTimer
from .budget import AccuracyBudget, BudgetReport, FinalModule, check_final, find_units_to_keep_high, keep_high
from .fp16 import Fp16Report
from .int4 import weight_only_format, weight_only_path
from .int8 import Int8Plan, Int8Report, plan_int8
from .masks import make_masks_fp16_safe
from .measured import float_part_ranges, to_fp16, to_int8
from .probe import probed_tensors
from .qformat import graph_format, quant_format
from .readout import AccuracyReadout, class_logit_outputs, log_readout, measure
from .report import PrecisionReport
from .smoothquant import smooth, smoothable_groups
from .validate import validate_qdq

if TYPE_CHECKING:
    from ..calibrators.calibration import CalibrationResult
    from ..calibrators.data import CalibrationData
    from ..calibrators.observers import RangeCheck
    from ..spec import TensorSpec
    from .smoothquant import SmoothedTensor, SmoothUnit

logger = logging.getLogger(__name__)

__all__ = ["HeldOut", "PreparedData", "apply_precision", "carried_precision", "hold_back"]


def apply_precision(
    model: onnx.ModelProto,
    config: BuildConfig,
    calibration_data: CalibrationData | None,
    accuracy_budget: AccuracyBudget | str | None = None,
    validation_data: CalibrationData | None = None,
    timer: StageTimer | None = None,
) -> tuple[onnx.ModelProto, PrecisionReport]:
    """Write ``config.precision`` into ``model``; return the graph and its report.

    FP16: cast to FP16 with an FP32 keep-list measured on ``calibration_data``
    (optional; without it only weights and exclusions decide, and nothing is
    checked for Inf/NaN). INT8 and FP8: Q/DQ pairs with scales from the calibrator
    (needs ``calibration_data`` or an existing ``calibration_cache``), the rest
    in ``config.float_part_precision``; with ``accuracy_budget``, the units the
    search keeps high stay out of INT8. ``timer`` collects the seconds of each stage.
    """
    timer = timer or StageTimer()
    if accuracy_budget is not None and not (config.precision.quantized or config.precision.weight_only):
        raise ConfigError(
            f"accuracy_budget applies to precision='int8', 'fp8', 'int4' or 'nvfp4' (it chooses which layers "
            f"leave the low precision), "
            f"not to precision={config.precision.value!r}"
        )
    carried = carried_precision(model)
    if computes_in_bf16(model) and config.precision is not Precision.FP32:
        raise ConfigError(
            f"the model computes in BF16, and trtopt writes precision={config.precision.value!r} only into "
            "FP32 or FP16 models: compile model.float() (or model.half()) with this precision, "
            "or this model at precision='fp32', which runs it in BF16 as it is"
        )
    if carried == "fp16" and config.precision.quantized:
        # A model.half() (or a graph cast to FP16 elsewhere): quantize what it computes, widened to
        # FP32 first (exact for its weights), as if compiled from its FP32 original; FP16 I/O stays.
        logger.info(
            "the graph computes in FP16; widening it to FP32 (exact for its weights) before %s",
            config.precision.value.upper(),
        )
        model, carried = widen_to_fp32(model), None
    if carried is not None:
        return model, carried_report(model, carried, config, accuracy_budget)
    if config.precision is Precision.FP32:
        if calibration_data is not None:
            logger.info("calibration_data is ignored at fp32")
        return model, PrecisionReport()
    with timer.stage("data split and FP32 reference"):
        data = PreparedData.prepare(model, config, calibration_data, accuracy_budget, validation_data)
    data.timer = timer
    try:
        if config.precision is Precision.FP16:
            return fp16_path(model, config, data)
        if config.precision.weight_only:
            return weight_only_path(model, config, data)
        return int8_path(model, config, data)
    finally:
        data.close()


def computes_in_bf16(model: onnx.ModelProto) -> bool:
    """Whether the graph has BF16 weights or Casts to BF16 (a ``model.bfloat16()``)."""
    bf16 = onnx.TensorProto.BFLOAT16
    return any(t.data_type == bf16 for t in model.graph.initializer) or any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == bf16 for a in node.attribute)
        for node in model.graph.node
    )


def carried_precision(model: onnx.ModelProto) -> str | None:
    """'nvfp4'/'int4' for 4-bit weights, 'fp8' or 'int8' for a graph with Q/DQ nodes, 'fp16' for one
    computing in FP16, else None."""
    weight_only = weight_only_format(model)  # first: NVFP4's block scales are FP8
    if weight_only is not None:
        return weight_only
    fmt = graph_format(model)
    if fmt is not None:
        return fmt.name
    half = onnx.TensorProto.FLOAT16
    casts_to_half = any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == half for a in node.attribute)
        for node in model.graph.node
    )
    if casts_to_half or any(t.data_type == half for t in model.graph.initializer):
        return "fp16"
    return None


def carried_report(
    model: onnx.ModelProto, carried: str, config: BuildConfig, accuracy_budget: AccuracyBudget | str | None
) -> PrecisionReport:
    """A graph exported by export_onnx (or quantized elsewhere) is built as it is, no recalibration."""
    if accuracy_budget is not None or config.precision.value not in ("fp32", carried):
        raise ConfigError(
            f"the graph already carries its precision ({carried}: it has "
            f"{'FP16 casts or weights' if carried == 'fp16' else 'Q/DQ nodes'}), so precision="
            f"{config.precision.value!r}{' with an accuracy_budget' if accuracy_budget is not None else ''} "
            "cannot be applied to it; compile the FP32 model instead, or this graph without those settings"
        )
    logger.info("the graph already carries its precision (%s); not applying precision passes", carried)
    return PrecisionReport(precision=carried, from_graph=True, qdq_nodes=validate_qdq(model))


# ------------------------------------------------------------------ data


@dataclass
class HeldOut:
    """Batches the ranges were not calibrated on, with the FP32 graph's outputs on them.

    ``feeds`` and ``reference`` are read batch by batch (the reference outputs are spooled to
    disk), so judging a module costs no memory per batch, whatever the batches' shapes.
    ``classifiers`` are the outputs read as class logits (``readout.class_logit_outputs``).
    """

    feeds: Batches
    labels: np.ndarray | None
    reference: Spool
    held_back: bool
    classifiers: list[int] = field(default_factory=list)

    def readout(self, graph: onnx.ModelProto, precision: str, hints: Callable[[], list[str]]) -> AccuracyReadout:
        """Measure ``graph`` against FP32 and log the result; ``hints()`` (what to try, run only
        when the module drifts: it may measure ranges again) goes into the warning."""
        readout = measure(graph, self.reference, self.feeds, held_back=self.held_back, classifiers=self.classifiers)
        log_readout(readout, precision, [] if readout.ok else hints())
        return readout

    def close(self) -> None:
        self.reference.close()


def hold_back(
    model: onnx.ModelProto,
    calibration_data: CalibrationData | None,
    validation_data: CalibrationData | None,
    inputs: Sequence[TensorSpec],
    max_batches: int | None,
    *,
    required: bool,
    classifier_outputs: bool | None = None,
) -> tuple[Batches | None, HeldOut]:
    """Split off the batches that judge the compiled module (the accuracy readout and budget).

    ``validation_data`` when given, else the last fifth of the calibration batches (at most
    ``HELD_BACK_MAX_BATCHES``). Calibration data too small to split is used for both, and the
    readout says so, unless an accuracy budget needs held-back data (then the error says what
    to pass). The FP32 outputs on the held-back batches are spooled to disk as they come.
    """
    if calibration_data is not None:
        # Read once (a one-shot iterator is spooled): a failed split must not lose it.
        limit = batches_to_read(max_batches) if validation_data is None else max_batches
        calibration_data = open_batches(calibration_data, inputs, limit)
    try:
        calibration, feeds, labels = split_validation(calibration_data, validation_data, inputs, max_batches)
        held_back = True
    except ConfigError:
        if required or validation_data is not None:
            raise
        calibration = feeds = open_batches(calibration_data, inputs, max_batches)
        labels, held_back = None, False
        logger.info("one calibration batch only: the accuracy readout is measured on it, none is held back")
    reference = Spool(prefix="trtopt-reference-")
    for outputs in run_batches(model, feeds):
        reference.append(outputs)
    return calibration, HeldOut(feeds, labels, reference, held_back, class_logit_outputs(model, classifier_outputs))


@dataclass
class PreparedData:
    """The user's data as the passes read it: calibration (re-iterable), and the held-back part."""

    inputs: Sequence[TensorSpec]
    calibration_data: Batches | None = None  # the calibration batches, when there is calibration data
    batches: Callable[[], Iterator[Mapping[str, Any]]] | None = None  # calibration feeds, re-iterable
    held_out: HeldOut | None = None
    budget: AccuracyBudget | None = None
    excluded: dict[str, Any] = field(default_factory=dict)  # the user's exclusions, as the passes take them
    timer: StageTimer = field(default_factory=StageTimer)

    @classmethod
    def prepare(
        cls, model: onnx.ModelProto, config: BuildConfig, calibration_data: CalibrationData | None,
        accuracy_budget: AccuracyBudget | str | None, validation_data: CalibrationData | None,
    ) -> PreparedData:
        data = cls(inputs=tensor_specs(model.graph.input), budget=_parse_budget(accuracy_budget))
        data.excluded = {"exclude_nodes": config.exclude_nodes, "exclude_op_types": config.exclude_op_types}
        # A budget needs held-back data even when a calibration cache makes calibration need none:
        # hold_back then raises the ConfigError that says what to pass, before any work is done.
        if calibration_data is not None or validation_data is not None or data.budget is not None:
            calibration_data, data.held_out = hold_back(
                model, calibration_data, validation_data, data.inputs, config.calibration_batches,
                required=data.budget is not None, classifier_outputs=config.classifier_outputs,
            )
        if calibration_data is not None:
            calibration = open_batches(calibration_data, data.inputs, config.calibration_batches)
            data.calibration_data, data.batches = calibration, calibration.__iter__
        return data

    def budget_and_held_out(self) -> tuple[AccuracyBudget, HeldOut]:
        """The accuracy budget and the held-back batches it is judged on, for the steps that run with a budget.

        ``prepare`` holds batches back whenever there is a budget (or raises the ConfigError that
        says what to pass), so a missing part here is a trtopt bug, not a user error.
        """
        if self.budget is None or self.held_out is None:
            raise RuntimeError(
                "trtopt bug: an accuracy-budget step ran without "
                f"{'a budget' if self.budget is None else 'held-back batches'}; please report it"
            )
        return self.budget, self.held_out

    def close(self) -> None:
        """Delete what was spooled to disk (the user's one-shot data, the held-back reference outputs)."""
        if self.held_out is not None:
            self.held_out.close()
            self.held_out.feeds.close()
        if self.calibration_data is not None:
            self.calibration_data.close()


def _parse_budget(accuracy_budget: AccuracyBudget | str | None) -> AccuracyBudget | None:
    if accuracy_budget is None or isinstance(accuracy_budget, AccuracyBudget):
        return accuracy_budget
    return AccuracyBudget.parse(str(accuracy_budget))


# ------------------------------------------------------------------ FP16


def fp16_path(model: onnx.ModelProto, config: BuildConfig, data: PreparedData) -> tuple[onnx.ModelProto, PrecisionReport]:
    """FP16 with an FP32 keep-list measured on the calibration data, and its readout."""
    if data.batches is None:
        logger.warning(
            "precision='fp16' without calibration_data: the FP32 keep-list only covers weights "
            "and exclusions, and the graph is not checked for overflow; pass calibration_data"
        )
    with data.timer.stage("fp16 keep-list and overflow check"):
        converted, fp16_report = to_fp16(model, data.batches, threshold=config.fp16_threshold, **data.excluded)
    report = PrecisionReport(
        precision="fp16", qdq_nodes=0, overflow_checked=data.batches is not None, **fp16_report.to_json()
    )
    if data.held_out is not None:
        with data.timer.stage("readout"):
            report.accuracy = data.held_out.readout(converted, "fp16", lambda: [
                "Try exclude_nodes=[...] for the layers that overflow, a lower fp16_threshold, or precision='fp32'."
            ])
    return converted, report


# ------------------------------------------------------------------ INT8 and FP8


@dataclass
class Calibrated:
    """The graph to quantize (smoothed, when SmoothQuant ran), its plan and its ranges."""

    model: onnx.ModelProto
    plan: Int8Plan
    plan_options: dict[str, Any]  # plan_int8's keywords: the accuracy budget re-plans with the same ones
    amax: dict[str, float]
    calibration: CalibrationResult
    seconds: float
    smoothed: list[SmoothedTensor] = field(default_factory=list)
    smoothed_ranges: dict[str, float] = field(default_factory=dict)
    smoothed_calibration: CalibrationResult | None = None  # of the smoothed tensors, when data allowed a pass
    # The FP16 float part's FP32 ranges (float_part_ranges), when the last pass over ``model`` measured them.
    float_ranges: dict[str, float] | None = None

    @property
    def extents(self) -> dict[str, tuple[float, float]]:
        """Observed (min, max) per tensor for the CPU layout; a smoothed tensor's only when it was calibrated."""
        extents = {k: v for k, v in self.calibration.extents.items() if k not in self.smoothed_ranges}
        if self.smoothed_calibration is not None:
            extents.update(self.smoothed_calibration.extents)
        return extents

    @property
    def smoothed_method(self) -> str | None:
        """How the smoothed tensors' ranges were chosen (None: nothing was smoothed)."""
        if not self.smoothed_ranges:
            return None
        if self.smoothed_calibration is not None:
            return self.smoothed_calibration.method
        return "minmax"  # max |x / s| from the per-channel statistics (a cached calibration has no data)


def int8_path(model: onnx.ModelProto, config: BuildConfig, data: PreparedData) -> tuple[onnx.ModelProto, PrecisionReport]:
    """Q/DQ (INT8 or FP8) with calibrated ranges; with a budget, the units it needs stay high."""
    calibrated = calibrate_plan(model, config, data)
    builder = Int8Builder(calibrated, config, data)
    budget_report = None
    if data.budget is not None:
        with data.timer.stage("accuracy budget"):
            budget_report = search_budget(calibrated, config, data, builder)
    kept = frozenset(budget_report.kept_high) if budget_report is not None else frozenset()
    with data.timer.stage("q/dq and float part"):
        quantized, int8_report, fp16_report = builder.build(kept)
    report = int8_report_of(calibrated, config, data, int8_report, fp16_report)
    if budget_report is not None:
        budget, held_out = data.budget_and_held_out()
        # The search measured this very module (or its cached twin): no need to run it again.
        check_final(budget_report, quantized, held_out.reference, held_out.feeds, held_out.labels, budget,
                    value=budget_report.final, precision=config.precision)
        report.accuracy_budget = budget_report
    readout_data = data.held_out
    if readout_data is not None:
        checks = _quantized_checks(calibrated)
        with data.timer.stage("readout"):
            report.accuracy = readout_data.readout(
                quantized, quant_format(config.precision).name,
                lambda: int8_hints(calibrated, checks, readout_data.feeds, data.inputs),
            )
    return quantized, report


def calibrate_plan(model: onnx.ModelProto, config: BuildConfig, data: PreparedData) -> Calibrated:
    """Plan the Q/DQ pairs, calibrate their activations, then smooth (SmoothQuant) and re-plan."""
    fmt = quant_format(config.precision)
    plan_options = {
        "fmt": fmt.name, "keep_first_last": config.int8_keep_first_last,
        "quantize_attention": config.int8_attention, "quantize_conv_outputs": config.int8_layout == "cpu",
        **data.excluded,
    }
    with data.timer.stage("q/dq plan"):
        plan = plan_int8(model, **plan_options)
        groups: dict[str, list[SmoothUnit]] = {}
        if config.smoothquant is not None:
            groups = smoothable_groups(model, plan)
    alpha = config.smoothquant
    smoothing = bool(groups) and alpha is not None  # groups are only looked for with an alpha
    start = time.perf_counter()
    with data.timer.stage("calibration"):
        calibration = calibrate(
            model, plan.activation_tensors, data.calibration_data, input_specs=data.inputs,
            method=config.calibration_method.value, percentile=config.percentile,
            max_batches=config.calibration_batches, cache_path=config.calibration_cache,
            progress=logger.isEnabledFor(logging.INFO), channel_max_for=list(groups),
            peaks_for=[] if smoothing else float_part_probe(model, config, data),
        )
    calibrated = Calibrated(model, plan, plan_options, dict(calibration.amax), calibration, time.perf_counter() - start)
    calibrated.float_ranges = calibration.peaks or None
    if smoothing and alpha is not None:
        with data.timer.stage("smoothquant"):
            calibrated.model, calibrated.smoothed_ranges, calibrated.smoothed = smooth(
                model, groups, calibration.channel_max, alpha
            )
            calibrated.amax.update(calibrated.smoothed_ranges)
            if calibrated.smoothed_ranges and not calibration.from_cache:
                # The smoothed tensors x / s get their ranges from the chosen calibrator, with range
                # checks, like every other activation: a second pass, over these tensors only.
                calibrated.smoothed_calibration = calibrate(
                    calibrated.model, list(calibrated.smoothed_ranges), data.calibration_data, input_specs=data.inputs,
                    method=smoothed_calibrator(config.calibration_method).value, percentile=config.percentile,
                    max_batches=config.calibration_batches, progress=logger.isEnabledFor(logging.INFO),
                    peaks_for=float_part_probe(calibrated.model, config, data),
                )
                calibrated.amax.update(calibrated.smoothed_calibration.amax)
                calibrated.float_ranges = calibrated.smoothed_calibration.peaks or None
            elif calibrated.smoothed_ranges:
                logger.info(
                    "smoothquant: the calibration came from the cache, so the %d smoothed tensor(s) take max |x / s| "
                    "from its per-channel statistics (minmax), not the %s calibrator",
                    len(calibrated.smoothed_ranges), calibration.method,
                )
            calibrated.seconds = time.perf_counter() - start
            # The units now read the smoothed tensors: plan again, every other Q/DQ stays where it was.
            calibrated.plan = plan_int8(calibrated.model, **plan_options)
    return calibrated


def float_part_probe(model: onnx.ModelProto, config: BuildConfig, data: PreparedData) -> list[str]:
    """The tensors an FP16 float part needs max |x| of (``float_part_ranges``), for the last
    calibration pass over ``model`` to measure as well: the probe runs the same graph on the
    same batches, so a pass of its own would repeat it.

    None without data, for an FP32 float part, or when attention masks need the FP16
    rewrite: the probe measures the rewritten graph, whose softmax differs on fully masked
    rows, so calibration cannot run there. Measured in the calibration pass, every activation
    is read by a reduction, so ONNX Runtime fuses less of the graph than for calibration alone:
    the calibrated tensors can differ in their last bits from a pass that measures them only
    (a BERT-style encoder: ranges up to 2e-7 apart).
    """
    if config.float_part_precision.value != "fp16" or data.batches is None:
        return []
    if make_masks_fp16_safe(model)[1].rewrites:
        return []
    return probed_tensors(model)


def smoothed_calibrator(method: CalibratorKind) -> CalibratorKind:
    """The calibrator of SmoothQuant's smoothed tensors: the one chosen, but max |x| for ``auto``.

    SmoothQuant flattens the outlier channels so that the max range fits (ModelOpt calibrates
    smoothed activations with max too); ``auto`` clips their tail instead, which cost MiniLM's
    worst unseen sentence 0.995 -> 0.984 cosine to FP32 (0.9947 with max).
    """
    return CalibratorKind.MINMAX if method == CalibratorKind.AUTO else CalibratorKind(method)


class Int8Builder:
    """Builds the INT8 module as compiled, with some units left out of INT8; keeps the latest build,
    so the module the budget search measured last is not built again."""

    def __init__(self, calibrated: Calibrated, config: BuildConfig, data: PreparedData) -> None:
        self.calibrated, self.config, self.data = calibrated, config, data
        self.latest: dict[frozenset[str], tuple[onnx.ModelProto, Int8Report, Fp16Report | None]] = {}
        # The FP16 float part's ranges are the FP32 graph's, whatever units stay high: measured once
        # (in the calibration pass, where it could).
        self.float_ranges = calibrated.float_ranges

    def build(self, kept: frozenset[str] = frozenset()) -> tuple[onnx.ModelProto, Int8Report, Fp16Report | None]:
        if kept in self.latest:
            return self.latest[kept]
        model, plan = self.calibrated.model, self.calibrated.plan
        if kept:
            ops = {n.name: n.op_type for n in model.graph.node}
            plan = keep_high(plan, kept, ops, node_modules(model))
        float_precision = self.config.float_part_precision.value
        if float_precision == "fp16" and self.data.batches is not None and self.float_ranges is None:
            self.float_ranges = float_part_ranges(model, self.data.batches)
        result = to_int8(
            model, plan, self.calibrated.amax, self.data.batches, float_precision=float_precision,
            threshold=self.config.fp16_threshold, layout=self.config.int8_layout, extents=self.calibrated.extents,
            ranges=self.float_ranges, **self.data.excluded,
        )
        self.latest = {kept: result}
        return result


def search_budget(calibrated: Calibrated, config: BuildConfig, data: PreparedData, builder: Int8Builder) -> BudgetReport:
    """The fewest units kept out of INT8 that meet the accuracy budget."""
    budget, held_out = data.budget_and_held_out()
    # The analysis measures INT8's error alone (FP32 float part). The module as built adds its
    # FP16 float part, so the search measures it too, and keeps more units high while it misses.
    tag = f"{config.float_part_precision.value} threshold={config.fp16_threshold:g}"
    final = FinalModule(tag, lambda kept: builder.build(kept)[0])
    return find_units_to_keep_high(
        calibrated.model, calibrated.amax, held_out.feeds, held_out.labels, budget,
        plan_options=calibrated.plan_options, cache_dir=config.sensitivity_cache_dir,
        reference=held_out.reference, final=final,
    )


def int8_report_of(
    calibrated: Calibrated, config: BuildConfig, data: PreparedData, int8_report: Int8Report,
    fp16_report: Fp16Report | None,
) -> PrecisionReport:
    """The report of the Q/DQ pass, its calibration, its FP16 part and its ranges."""
    method = config.calibration_method.value
    calibration, plan = calibrated.calibration, calibrated.plan
    report = PrecisionReport(
        precision=quant_format(config.precision).name,
        calibrator=method,
        calibration_seconds=round(calibrated.seconds, 3),
        calibration_batches=calibration.num_batches,
        calibration_from_cache=calibration.from_cache,
        float_precision=config.float_part_precision.value,
        int8_layout=config.int8_layout if config.precision is Precision.INT8 else None,
        overflow_checked=data.batches is not None and fp16_report is not None,
        percentile=config.percentile if method == "percentile" else None,
        **int8_report.to_json(),
        **(fp16_report.to_json() if fp16_report is not None else {}),
    )
    report.activation_amax = {name: calibrated.amax[name] for name in plan.activation_tensors}
    if calibrated.smoothed:
        report.smoothquant = {
            "alpha": config.smoothquant, "calibrator": calibrated.smoothed_method,
            "tensors": [t.to_json() for t in calibrated.smoothed],
        }
    checks = _quantized_checks(calibrated)
    if checks:
        # Each range with the module of the layer it feeds (its quantized tensor keeps its ONNX name).
        modules = node_modules(calibrated.model)
        report.range_checks = {
            name: {**check.to_json(), **module_of_use(plan, name, modules)} for name, check in checks.items()
        }
    return report


def _quantized_checks(calibrated: Calibrated) -> dict[str, RangeCheck]:
    """Checked ranges of the tensors quantized as calibrated (smoothed ones from their own pass, when it ran)."""
    checks = {k: v for k, v in calibrated.calibration.checks.items() if k not in calibrated.smoothed_ranges}
    if calibrated.smoothed_calibration is not None:
        checks.update(calibrated.smoothed_calibration.checks)
    return {name: checks[name] for name in calibrated.plan.activation_tensors if name in checks}


def int8_hints(
    calibrated: Calibrated, checks: Mapping[str, RangeCheck], feeds: Batches, inputs: Sequence[TensorSpec]
) -> list[str]:
    """The worst ranges (those not checked at calibration measured now) and what to try."""
    model, plan, amax, calibration = calibrated.model, calibrated.plan, calibrated.amax, calibrated.calibration
    unchecked = {name: amax[name] for name in plan.activation_tensors if name not in checks}
    checks = {**checks, **(check_ranges(model, unchecked, feeds, input_specs=inputs) if unchecked else {})}
    worst = sorted(checks.items(), key=lambda item: (-item[1].clipped, -item[1].error))[:3]
    shown = "; ".join(f"{name!r} clips {c.clipped:.1%} of its values (error {c.error:.3g})" for name, c in worst)
    # Name the layers those ranges feed by module path (exclude_nodes takes module globs) where known.
    modules = node_modules(model)
    consumers = [modules.get(node) or node for name, _ in worst for node, _ in plan.activations.get(name, [])[:1]]
    others = " or ".join(repr(m) for m in ("auto", "minmax") if m != calibration.method)
    retry = "delete the calibration cache to calibrate again, " if calibration.from_cache else ""
    how = calibration.method + (", from the calibration cache" if calibration.from_cache else "")
    if calibrated.smoothed_method not in (None, calibration.method):
        how += f"; SmoothQuant's smoothed tensors: {calibrated.smoothed_method}"
    return [
        f"Worst ranges ({how}): {shown}.",
        f"Try: {retry}calibrator={others}, accuracy_budget='cosine>=0.99', or exclude_nodes={consumers[:3]!r}.",
    ]


def module_of_use(plan: Int8Plan, tensor: str, modules: Mapping[str, str]) -> dict[str, str]:
    """``{"module": ...}``: the module of the first layer reading the quantized ``tensor``, when known."""
    uses = plan.activations.get(tensor, [])
    return {"module": modules[uses[0][0]]} if uses and uses[0][0] in modules else {}
