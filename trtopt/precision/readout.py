"""What a precision cost: the compiled graph measured against the FP32 graph on held-back data.

``compile`` calls ``measure`` whenever it has calibration data, for FP16 and INT8
alike, so a user never gets a broken module without a warning: one INFO line
always, a WARNING naming the worst tensors and what to try when the module
drifts from FP32 (mean cosine or top-1 agreement below ``WARN_BELOW``).

Both graphs run under ONNX Runtime on the CPU with FP16 tensors rounded as
TensorRT stores them (the executor's ``emulate_fp16``), on batches the ranges were not
calibrated on (``validation_data``, or the last fifth of the calibration
batches, held back). On a GPU the TensorRT engine is built from exactly this
graph; its kernels differ from ONNX Runtime's only by float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..backends.onnxruntime import run_graph
from ..metrics import argmax_agreement, max_abs_error, sample_cosines

logger = logging.getLogger(__name__)

WARN_BELOW = 0.99  # mean cosine or top-1 agreement under this logs a WARNING


@dataclass(frozen=True)
class AccuracyReadout:
    """The compiled module against FP32 on ``samples`` held-back samples.

    ``cosine`` is the mean per-sample cosine similarity (``metrics.mean_sample_cosine``,
    the accuracy budget's ``cosine``), ``min_cosine`` the worst sample's, both the worst over outputs.
    ``top1_agreement`` is the share of samples whose argmax over the last axis
    agrees with FP32, for outputs shaped like a classifier's ([N, classes]), else
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
        return self.cosine >= WARN_BELOW and (self.top1_agreement is None or self.top1_agreement >= WARN_BELOW)

    def describe(self) -> str:
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.1%}"
        where = "held-back" if self.held_back else "calibration (none could be held back)"
        return (
            f"cosine {self.cosine:.4f} (worst sample {self.min_cosine:.4f}), max abs error "
            f"{self.max_abs:.3g}{top1} on {self.samples} {where} samples"
        )

    def to_json(self) -> dict[str, float | int | bool | None]:
        return asdict(self)


def _is_classifier(output: np.ndarray) -> bool:
    return output.ndim == 2 and output.shape[1] >= 2 and output.dtype.kind == "f"


def compare(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], held_back: bool) -> AccuracyReadout:
    """The readout of ``outputs`` against the FP32 ``reference`` (lists of arrays, one per output)."""
    cosines = [sample_cosines(a, b) for a, b in zip(outputs, reference)]
    agreements = [argmax_agreement(a, b) for a, b in zip(outputs, reference) if _is_classifier(b)]
    return AccuracyReadout(
        samples=int(reference[0].shape[0]) if reference[0].ndim else 1,
        cosine=min(float(c.mean()) for c in cosines),
        min_cosine=min(float(c.min()) for c in cosines),
        max_abs=max_abs_error(outputs, reference),
        top1_agreement=min(agreements) if agreements else None,
        held_back=held_back,
    )


def measure(
    graph: object,
    reference: Sequence[np.ndarray],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    held_back: bool,
) -> AccuracyReadout:
    """Run the compiled ``graph`` on ``feeds`` and compare with the FP32 ``reference`` outputs."""
    return compare(run_graph(graph, feeds), reference, held_back)


def log_readout(readout: AccuracyReadout, precision: str, hints: Sequence[str]) -> None:
    """One INFO line; a WARNING with ``hints`` (the worst tensors, what to try) when it drifts."""
    if readout.ok:
        logger.info("%s accuracy against FP32: %s", precision.upper(), readout.describe())
        return
    logger.warning(
        "%s output drifts from FP32: %s, below %.2f. %s",
        precision.upper(), readout.describe(), WARN_BELOW, " ".join(hints),
    )
