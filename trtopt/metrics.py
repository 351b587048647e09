"""How far a model's outputs are from a reference's: the math behind every accuracy number trtopt reports.

The accuracy budget (``precision.budget``), the compile-time readout
(``precision.readout``) and the benchmark harness (``bench``) all compare here,
so one name means one computation everywhere. Two families differ on a batch
and are named apart:

- **Per sample** (``sample_cosines``, ``mean_sample_cosine``): each sample (a
  row along axis 0) is compared with its own reference, then averaged. Every
  sample counts alike, so one badly scaled sample in a batch shows.
- **Flattened** (``flatten``, ``flat_cosine``): every element of every output in
  one vector. Samples with large outputs dominate; a sample scaled by a
  constant barely moves it.

Functions taking ``(outputs, reference, labels=None)`` are the accuracy
budget's metrics (``precision.budget.METRICS``); ``outputs`` and ``reference``
are lists of arrays, one per model output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import ConfigError

Outputs = Sequence[np.ndarray]


# ------------------------------------------------------------------ per sample


def _per_sample(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim > 1 else a.reshape(-1, 1).astype(np.float64)


def sample_cosines(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (row along axis 0) of one output to its reference."""
    a, b = _per_sample(output), _per_sample(reference)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    sims = (a * b).sum(axis=1) / np.maximum(norm_a * norm_b, 1e-30)
    # Both zero: identical. One zero: nothing in common (a collapsed output must not pass).
    return np.where((norm_a == 0) & (norm_b == 0), 1.0, np.where((norm_a == 0) | (norm_b == 0), 0.0, sims))


def mean_sample_cosine(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """Mean per-sample cosine similarity, the worst over outputs (the budget's ``cosine``)."""
    return min((float(sample_cosines(a, b).mean()) for a, b in zip(outputs, reference)), default=1.0)


def max_abs_error(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """The largest absolute difference over every element of every output (the budget's ``max_abs``)."""
    return max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(outputs, reference))


def worst_mean_abs_error(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """Each output's mean absolute difference, the worst over outputs (the budget's ``mean_abs``)."""
    return max(float(np.abs(a.astype(np.float64) - b).mean()) for a, b in zip(outputs, reference))


def argmax_agreement(output: np.ndarray, reference: np.ndarray) -> float:
    """Share of samples whose argmax over the last axis of ``output`` agrees with ``reference``'s."""
    return float((output.argmax(-1) == reference.argmax(-1)).mean())


def top1_agreement(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """``argmax_agreement`` of the first output (the budget's ``top1``)."""
    return argmax_agreement(outputs[0], reference[0])


def _need_labels(labels: np.ndarray | None) -> np.ndarray:
    if labels is None:
        raise ConfigError(
            "the 'accuracy' metrics need labels: give validation batches as (inputs..., labels) tuples"
        )
    return labels


def label_accuracy(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """Task top-1 accuracy of the first output against the labels (the budget's ``accuracy``)."""
    return float((outputs[0].argmax(-1) == _need_labels(labels)).mean())


def accuracy_drop(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """FP32 accuracy minus this model's accuracy (0.002 is 0.2 points)."""
    return label_accuracy(reference, reference, labels) - label_accuracy(outputs, reference, labels)


# ------------------------------------------------------------------- flattened


def flatten(outputs: Outputs) -> np.ndarray:
    """Every element of every output in one vector, in order (dtype kept)."""
    return np.concatenate([a.ravel() for a in outputs])


def flat_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine similarity of two vectors holding everything flattened (``flatten``).

    Where either vector is all zeros the cosine is undefined: 1.0 when both are
    (identical), else 0.0 (a collapsed output must not pass).
    """
    norm = float(np.linalg.norm(reference) * np.linalg.norm(candidate))
    return float(np.dot(reference, candidate) / norm) if norm > 0 else float(np.array_equal(reference, candidate))
