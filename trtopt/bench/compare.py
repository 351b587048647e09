"""Accuracy of a candidate against the FP32 reference: outputs flattened to numpy, then compared.

The math is ``trtopt.metrics``'s flattened family: a benchmark row's cosine is
that of every output element in one vector (``metrics.flat_cosine``), unlike the
accuracy budget's mean per-sample cosine (``metrics.mean_sample_cosine``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..metrics import argmax_agreement, flat_cosine, flatten


def output_leaves(obj: Any) -> list[np.ndarray]:
    """Flatten a model's (nested) outputs into float64 numpy arrays, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().to("cpu", torch.float64).numpy()]
    if isinstance(obj, np.ndarray):
        return [obj.astype(np.float64)]
    if isinstance(obj, Mapping):
        return [leaf for value in obj.values() for leaf in output_leaves(value)]
    if isinstance(obj, (tuple, list)):
        return [leaf for value in obj for leaf in output_leaves(value)]
    raise InputError(f"cannot compare an output of type {type(obj).__name__}; expected tensors")


@dataclass(frozen=True)
class Accuracy:
    """How far a candidate's outputs are from the FP32 reference's on the same inputs."""

    samples: int
    max_abs_error: float
    mean_abs_error: float
    cosine_similarity: float  # of every output element in one vector (metrics.flat_cosine)
    top1_agreement: float | None  # None when the model is not a classifier


def compare_outputs(reference: Any, candidate: Any, *, classifier: bool | None = None) -> Accuracy:
    """Compare two (nested) outputs; ``classifier=None`` decides from the first output's shape."""
    ref, cand = output_leaves(reference), output_leaves(candidate)
    if len(ref) != len(cand):
        raise InputError(f"the reference has {len(ref)} outputs but the candidate has {len(cand)}")
    for i, (r, c) in enumerate(zip(ref, cand)):
        if r.shape != c.shape:
            raise InputError(f"output {i} has shape {c.shape} but the reference has {r.shape}")
    r_all, c_all = flatten(ref), flatten(cand)
    if r_all.size == 0:
        raise InputError("the outputs are empty; nothing to compare")
    diff = np.abs(r_all - c_all)
    first_ref, first_cand = ref[0], cand[0]
    if classifier is None:
        classifier = first_ref.ndim == 2 and first_ref.shape[1] > 1
    top1 = None
    if classifier:
        if first_ref.ndim != 2:
            raise InputError(
                f"top-1 agreement needs a first output of shape [N, classes], got {first_ref.shape}"
            )
        top1 = argmax_agreement(first_cand, first_ref)
    return Accuracy(
        samples=int(first_ref.shape[0]) if first_ref.ndim else 1,
        max_abs_error=float(diff.max()),
        mean_abs_error=float(diff.mean()),
        cosine_similarity=flat_cosine(r_all, c_all),
        top1_agreement=top1,
    )


def run_in_chunks(fn: Callable[..., Any], inputs: Sequence[torch.Tensor], chunk: int) -> list[np.ndarray]:
    """Run ``fn`` over ``inputs`` ``chunk`` samples at a time (dim 0); return concatenated leaves.

    Used for accuracy: the evaluation set may be larger than the compiled batch range.
    """
    total = int(inputs[0].shape[0])
    parts: list[list[np.ndarray]] = []
    for start in range(0, total, chunk):
        parts.append(output_leaves(fn(*(t[start : start + chunk] for t in inputs))))
    return [np.concatenate(leaf) for leaf in zip(*parts)]
