"""The budget search's disk cache: metric values by set of units kept high, keyed by the analysis."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..._version import __version__
from ...files import atomic_write
from .metric import AccuracyBudget

logger = logging.getLogger(__name__)


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


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trtopt" / "sensitivity"
