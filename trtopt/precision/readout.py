"""What a precision cost: the compiled graph measured against the FP32 graph on held-back data.

``compile`` calls ``measure`` whenever it has calibration data, for FP16 and INT8
alike, so a user never gets a broken module without a warning: one INFO line
always, a WARNING naming the worst tensors and what to try when the module
drifts from FP32 (mean cosine or top-1 agreement below ``WARN_BELOW``; the
warning names each figure that failed and the threshold).

Both graphs run under ONNX Runtime on the CPU with FP16 tensors rounded as
TensorRT stores them (the executor's ``emulate_fp16``), on batches the ranges were not
calibrated on (``validation_data``, or the last fifth of the calibration
batches, at most ``HELD_BACK_MAX_BATCHES``, held back), compared batch by batch
(``metrics.Comparison``), so batch shapes may differ and memory does not grow. On a GPU the TensorRT engine is built from exactly this
graph; its kernels differ from ONNX Runtime's only by float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from ..executor.session import run_batches
from ..metrics import Comparison, Outputs

logger = logging.getLogger(__name__)

WARN_BELOW = 0.99  # mean cosine or top-1 agreement under this logs a WARNING

# A classifier's output is read off a Linear (Gemm, or MatMul plus a bias Add) or a softmax over it,
# possibly reshaped or cast. An embedding ends in pooling, a norm or a tanh: its argmax means nothing.
_LOGIT_OPS = frozenset({"Gemm", "MatMul", "Softmax", "LogSoftmax"})
_SHAPE_ONLY_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"})


@dataclass(frozen=True)
class AccuracyReadout:
    """The compiled module against FP32 on ``samples`` held-back samples.

    ``cosine`` is the mean per-sample cosine similarity (``metrics.mean_sample_cosine``,
    the accuracy budget's ``cosine``), ``min_cosine`` the worst sample's, both the worst over outputs.
    ``top1_agreement`` is the share of samples whose argmax over the last axis
    agrees with FP32, for outputs read as class logits (``class_logit_outputs``), else
    None. ``held_back`` is False when the data was too small to hold any back and
    the calibration batches themselves were used.
    """

    samples: int
    cosine: float
    min_cosine: float
    max_abs: float
    top1_agreement: float | None
    held_back: bool

    @property
    def ok(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        """Each figure below its threshold, named with both numbers."""
        failed = []
        if self.cosine < WARN_BELOW:
            failed.append(f"mean cosine {self.cosine:.4f} is below {WARN_BELOW:g}")
        if self.top1_agreement is not None and self.top1_agreement < WARN_BELOW:
            failed.append(f"top-1 agreement {self.top1_agreement:.1%} is below {WARN_BELOW:.0%}")
        return failed

    def describe(self) -> str:
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.1%}"
        where = "held-back" if self.held_back else "calibration (none could be held back)"
        return (
            f"cosine {self.cosine:.4f} (worst sample {self.min_cosine:.4f}), max abs error "
            f"{self.max_abs:.3g}{top1} on {self.samples} {where} samples"
        )

    def to_json(self) -> dict[str, float | int | bool | None]:
        return asdict(self)


def class_logit_outputs(model: onnx.ModelProto, setting: bool | None = None) -> list[int]:
    """Indices of the graph outputs read as class logits, whose top-1 agreement the readout reports.

    ``setting`` is ``BuildConfig.classifier_outputs``: True takes every float output of rank 2
    or more ([N, classes], or per-token logits [N, T, classes]: top-1 then counts positions),
    False none, None (the default) those a Linear or a softmax produces (through reshapes and
    casts), so an embedding model's pooled or normalised output is judged by cosine alone.
    """
    graph = model.graph
    candidates = [
        k for k, out in enumerate(graph.output)
        if out.type.tensor_type.HasField("shape") and len(out.type.tensor_type.shape.dim) >= 2
        and out.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    ]
    if setting is not None:
        return candidates if setting else []
    producers = {name: node for node in graph.node for name in node.output}
    constants = {t.name for t in graph.initializer} | {
        o for node in graph.node if node.op_type == "Constant" for o in node.output
    }

    def logits(name: str) -> bool:
        node = producers.get(name)
        while node is not None:
            if node.op_type in _LOGIT_OPS:
                return True
            if node.op_type == "Add" and len(node.input) == 2 and any(i in constants for i in node.input):
                name = next(i for i in node.input if i not in constants)  # a bias
            elif node.op_type in _SHAPE_ONLY_OPS:
                name = node.input[0]
            else:
                return False
            node = producers.get(name)
        return False

    return [k for k in candidates if logits(graph.output[k].name)]


def _is_classifier(output: np.ndarray) -> bool:
    return output.ndim == 2 and output.shape[1] >= 2 and output.dtype.kind == "f"


def readout_of(comparison: Comparison, classifiers: Collection[int], held_back: bool) -> AccuracyReadout:
    """The readout from a finished ``Comparison``; top-1 over ``classifiers`` (their worst)."""
    agreements = [comparison.argmax_agreement(k) for k in classifiers]
    agreements = [a for a in agreements if a == a]  # NaN: no batch had a 2-D output there
    return AccuracyReadout(
        samples=comparison.samples,
        cosine=comparison.mean_sample_cosine(),
        min_cosine=comparison.min_sample_cosine(),
        max_abs=comparison.max_abs_error(),
        top1_agreement=min(agreements) if agreements else None,
        held_back=held_back,
    )


def compare(
    outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], held_back: bool,
    classifiers: Collection[int] | None = None,
) -> AccuracyReadout:
    """The readout of ``outputs`` against the FP32 ``reference`` (one batch: one array per output).

    ``classifiers`` are the outputs read as class logits; None takes every float output shaped
    like a classifier's ([N, classes])."""
    if classifiers is None:
        classifiers = [k for k, b in enumerate(reference) if _is_classifier(np.asarray(b))]
    return compare_batches([outputs], [reference], held_back, classifiers)


def compare_batches(
    outputs: Iterable[Outputs], reference: Iterable[Outputs], held_back: bool, classifiers: Collection[int]
) -> AccuracyReadout:
    """The readout over batches compared one at a time (their shapes may differ)."""
    comparison = Comparison(argmax_outputs=classifiers)
    for out, ref in zip(outputs, reference):
        comparison.add(out, [np.asarray(r) for r in ref])
    return readout_of(comparison, classifiers, held_back)


def measure(
    graph: onnx.ModelProto,
    reference: Iterable[Outputs],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    held_back: bool,
    classifiers: Collection[int] = (),
) -> AccuracyReadout:
    """Run the compiled ``graph`` on ``feeds`` batch by batch against the FP32 ``reference`` outputs."""
    return compare_batches(run_batches(graph, feeds), reference, held_back, classifiers)


def log_readout(readout: AccuracyReadout, precision: str, hints: Sequence[str]) -> None:
    """One INFO line; a WARNING naming each figure below its threshold, with ``hints`` (the worst
    tensors, what to try), when it drifts."""
    failures = readout.failures()
    if not failures:
        logger.info("%s accuracy against FP32: %s", precision.upper(), readout.describe())
        return
    logger.warning(
        "%s output drifts from FP32: %s (%s). %s",
        precision.upper(), "; ".join(failures), readout.describe(), " ".join(hints),
    )
