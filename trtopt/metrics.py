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

from collections.abc import Collection, Iterable, Sequence

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


# ------------------------------------------------------------------ streamed over batches


def rows(output: np.ndarray) -> int:
    """Samples in one batch of an output: its length along axis 0 (a 0-d output is one sample)."""
    return int(output.shape[0]) if output.ndim else 1


class Comparison:
    """The metrics above, accumulated batch by batch (``add``), for any mix of batch shapes.

    Outputs are compared per batch and dropped, so memory does not grow with the data: per-sample
    cosines are kept (one float per sample, so the mean and the worst are exactly those of the
    concatenated outputs), the rest are running maxima, sums and counts. ``argmax_outputs`` are
    the outputs whose argmax agreement is counted (the budget's ``top1`` reads the first).
    """

    def __init__(self, argmax_outputs: Collection[int] = (0,)) -> None:
        self.argmax_outputs = set(argmax_outputs)
        self.samples = 0
        self._cosines: list[list[np.ndarray]] = []
        self._max_abs = 0.0
        self._abs_sums: list[float] = []
        self._abs_counts: list[int] = []
        self._agree: dict[int, list[int]] = {}  # output -> [agreeing positions, positions]
        self._labelled = 0
        self._correct = 0  # first output's argmax equal to the label
        self._reference_correct = 0

    def add(self, outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> None:
        """One batch: ``outputs`` and ``reference`` list one array per model output."""
        if not self._cosines:
            self._cosines = [[] for _ in reference]
            self._abs_sums, self._abs_counts = [0.0] * len(reference), [0] * len(reference)
        if len(outputs) != len(reference) or len(reference) != len(self._cosines):
            raise ConfigError(
                f"{len(outputs)} outputs compared with {len(reference)} reference outputs "
                f"(earlier batches had {len(self._cosines)}); every batch must give every output"
            )
        self.samples += rows(np.asarray(reference[0])) if len(reference) else 0
        for k, (a, b) in enumerate(zip(outputs, reference)):
            a, b = np.asarray(a), np.asarray(b)
            self._cosines[k].append(sample_cosines(a, b))
            diff = np.abs(a.astype(np.float64) - b)
            if diff.size:
                self._max_abs = max(self._max_abs, float(diff.max()))
            self._abs_sums[k] += float(diff.sum())
            self._abs_counts[k] += diff.size
            if k in self.argmax_outputs and a.ndim:
                agree = self._agree.setdefault(k, [0, 0])
                equal = a.argmax(-1) == b.argmax(-1)
                agree[0] += int(equal.sum())
                agree[1] += equal.size
        if labels is not None and len(outputs):
            labels = np.asarray(labels).reshape(-1)
            self._labelled += labels.size
            self._correct += int((np.asarray(outputs[0]).argmax(-1) == labels).sum())
            self._reference_correct += int((np.asarray(reference[0]).argmax(-1) == labels).sum())

    def sample_cosines(self, output: int) -> np.ndarray:
        return np.concatenate(self._cosines[output]) if self._cosines[output] else np.ones(0)

    def mean_sample_cosine(self) -> float:
        """Mean per-sample cosine, the worst over outputs (the budget's ``cosine``)."""
        return min((float(self.sample_cosines(k).mean()) for k in range(len(self._cosines))), default=1.0)

    def min_sample_cosine(self) -> float:
        """The worst sample's cosine over every output."""
        return min((float(self.sample_cosines(k).min()) for k in range(len(self._cosines))), default=1.0)

    def max_abs_error(self) -> float:
        return self._max_abs

    def worst_mean_abs_error(self) -> float:
        return max((s / c if c else 0.0 for s, c in zip(self._abs_sums, self._abs_counts)), default=0.0)

    def argmax_agreement(self, output: int = 0) -> float:
        agreeing, total = self._agree.get(output, (0, 0))
        return agreeing / total if total else float("nan")

    def label_accuracy(self) -> float:
        return self._correct / _need_labels_count(self._labelled)

    def reference_accuracy(self) -> float:
        return self._reference_correct / _need_labels_count(self._labelled)


def compare_batches(
    pairs: Iterable[tuple[Outputs, Outputs]], labels: np.ndarray | None = None, argmax_outputs: Collection[int] = (0,)
) -> Comparison:
    """A ``Comparison`` of ``(outputs, reference)`` batch pairs; ``labels`` (concatenated over the
    batches, one per sample) are split along the batches' samples."""
    comparison = Comparison(argmax_outputs)
    offset = 0
    for outputs, reference in pairs:
        batch_labels = None
        if labels is not None:
            count = rows(np.asarray(reference[0]))
            batch_labels, offset = labels[offset:offset + count], offset + count
        comparison.add(outputs, reference, batch_labels)
    return comparison


def _need_labels_count(count: int) -> int:
    if count == 0:
        _need_labels(None)
    return count


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
