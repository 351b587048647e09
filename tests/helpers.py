"""Shared assertions for tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def flat(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [leaf for v in obj.values() for leaf in flat(v)]
    if isinstance(obj, (tuple, list)):
        return [leaf for v in obj for leaf in flat(v)]
    return [obj]


def same_structure(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_structure(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_structure, a, b))
    return isinstance(b, type(a))


def max_relative_error(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max |expected| over all leaves (a scale-aware relative error).

    A missing or extra output is an AssertionError, not a pass: the leaves are counted first.
    """
    actual_leaves, expected_leaves = flat(actual), flat(expected)
    assert len(actual_leaves) == len(expected_leaves), (
        f"{len(actual_leaves)} output(s) where {len(expected_leaves)} were expected"
    )
    worst = 0.0
    for x, y in zip(actual_leaves, expected_leaves):
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        assert x.shape == y.shape, (x.shape, y.shape)
        scale = max(float(np.abs(y).max()), 1e-12)
        worst = max(worst, float(np.abs(x - y).max()) / scale)
    return worst
