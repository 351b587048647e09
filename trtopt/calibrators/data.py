"""Calibration data: turn whatever the user has into validated ``{input name: ndarray}`` batches.

Accepted forms (``calibration_data``):

* any iterable of batches (a torch ``DataLoader``, a list, a generator); each batch is
  - a dict keyed by input name,
  - a tuple or list mapped positionally onto the graph inputs; extra trailing
    elements (typically labels, as a ``DataLoader`` of ``(x, y)`` yields) are ignored,
  - a single tensor or array when the graph has one input;
* one array or tensor with one more dimension than the (single) input: a stack
  of batches along axis 0 (an array of the input's own rank is one batch);
* a path to a ``.npz`` file holding one array per input, keyed by input name
  (or ``arr_0``, ``arr_1``, ... positionally as ``np.savez(*arrays)`` writes
  them), each a stack of batches along axis 0, or one batch if it has the
  input's own rank.

Tensors are moved to the CPU as numpy arrays. Every batch is checked against
the graph inputs (names, dtype, rank, static dims, finiteness) and a problem is
a CalibrationError naming the batch index and the input.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CalibrationError
from ..spec import conversion_hint

if TYPE_CHECKING:
    from ..spec import TensorSpec

logger = logging.getLogger(__name__)



def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _to_numpy(value: Any, index: int, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if _is_tensor(value):
        tensor = value.detach().cpu()
        try:
            return tensor.numpy()
        except TypeError as exc:  # e.g. bfloat16 has no numpy dtype
            raise CalibrationError(
                f"calibration batch {index}, input {name!r}: a {tensor.dtype} tensor cannot be read "
                f"as numpy ({exc}); convert it to the model's input dtype"
            ) from exc
    raise CalibrationError(
        f"calibration batch {index}, input {name!r} is a {type(value).__name__}; "
        "pass torch tensors or numpy arrays"
    )


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or _is_tensor(value)


def _batch_dict(batch: Any, index: int, specs: Sequence[TensorSpec]) -> dict[str, Any]:
    names = [s.name for s in specs]
    if isinstance(batch, Mapping):
        unknown = [k for k in batch if k not in names]
        if unknown:
            raise CalibrationError(
                f"calibration batch {index} names unknown input(s) {unknown}; the graph's inputs are {names}"
            )
        missing = [n for n in names if n not in batch]
        if missing:
            raise CalibrationError(
                f"calibration batch {index} lacks input(s) {missing}; the graph's inputs are {names}"
            )
        return dict(batch)
    if isinstance(batch, (tuple, list)):
        if len(batch) < len(names):
            raise CalibrationError(
                f"calibration batch {index} has {len(batch)} element(s) but the graph takes "
                f"{len(names)} input(s) {names}; give one tensor per input, in order, or a dict"
            )
        if len(batch) > len(names) and index == 0:
            logger.info(
                "calibration batches have %d elements and the graph %d input(s) %s: using the first "
                "%d and ignoring the rest (labels?)",
                len(batch), len(names), names, len(names),
            )
        return dict(zip(names, batch))
    if _is_array(batch):
        if len(names) != 1:
            raise CalibrationError(
                f"calibration batch {index} is a single tensor but the graph takes {len(names)} "
                f"inputs {names}; give a tuple (one tensor per input) or a dict keyed by input name"
            )
        return {names[0]: batch}
    raise CalibrationError(
        f"calibration batch {index} is a {type(batch).__name__}; a batch must be a tensor, an "
        "array, a tuple/list of them (one per input) or a dict keyed by input name"
    )


def check_batch(batch: Any, index: int, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Validate one batch against the graph inputs and return it as numpy arrays."""
    values = _batch_dict(batch, index, specs)
    feeds = {}
    for spec in specs:
        array = _to_numpy(values[spec.name], index, spec.name)
        where = f"calibration batch {index}, input {spec.name!r}"
        if array.dtype.name != spec.dtype:
            raise CalibrationError(
                f"{where} has dtype {array.dtype.name} but the model expects {spec.dtype}; "
                f"convert it ({conversion_hint(spec.dtype)})"
            )
        if array.ndim != len(spec.shape):
            raise CalibrationError(
                f"{where} has rank {array.ndim} (shape {array.shape}) but the model expects rank "
                f"{len(spec.shape)} (shape {list(spec.shape)})"
            )
        for dim, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise CalibrationError(
                    f"{where} has shape {array.shape} but the model fixes dimension {dim} at {want} "
                    f"(expected shape {list(spec.shape)})"
                )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = "NaN" if np.isnan(array).any() else "Inf"
            raise CalibrationError(f"{where} contains {bad}; calibration data must be finite")
        feeds[spec.name] = np.ascontiguousarray(array)
    return feeds


def _stacked(arrays: Mapping[str, Any], specs: Sequence[TensorSpec], source: str) -> Iterator[dict[str, Any]]:
    """Batches from per-input arrays stacked along axis 0 (or one batch each, at the input's rank)."""
    ranks = {s.name: len(s.shape) for s in specs}
    counts = set()
    for name, array in arrays.items():
        if array.ndim == ranks[name] + 1:
            counts.add(array.shape[0])
        elif array.ndim == ranks[name]:
            counts.add(None)
        else:
            raise CalibrationError(
                f"{source}: array {name!r} has rank {array.ndim} (shape {tuple(array.shape)}); input "
                f"{name!r} has rank {ranks[name]}, so give rank {ranks[name]} (one batch) or "
                f"{ranks[name] + 1} (batches stacked along axis 0)"
            )
    if len(counts) > 1:
        raise CalibrationError(
            f"{source}: the arrays hold different numbers of batches "
            f"({ {n: tuple(a.shape) for n, a in arrays.items()} }); stack the same number for every input"
        )
    (count,) = counts
    if count is None:
        yield dict(arrays)
        return
    for k in range(count):
        yield {name: array[k] for name, array in arrays.items()}


def _load_npz(path: Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read calibration data {path}: {exc}") from exc
    positional = [f"arr_{i}" for i in range(len(names))]
    if set(stored) == set(positional):
        return {name: stored[key] for name, key in zip(names, positional)}
    unknown = [k for k in stored if k not in names]
    missing = [n for n in names if n not in stored]
    if unknown or missing:
        raise CalibrationError(
            f"{path} holds arrays {sorted(stored)} but the graph's inputs are {names}; "
            "save one array per input keyed by input name, e.g. np.savez(path, **{name: array})"
        )
    return stored


def iter_batches(
    data: Any, specs: Sequence[TensorSpec], max_batches: int | None = None
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(index, feeds)`` for every validated batch, at most ``max_batches`` of them."""
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise CalibrationError(f"max_batches={max_batches!r} must be a positive integer or None")
    source: Iterable[Any]
    if data is None:
        raise CalibrationError("calibration_data is None; INT8 calibration needs representative input batches")
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.suffix != ".npz":
            raise CalibrationError(
                f"calibration_data={str(data)!r} is a path but not a .npz file; pass a .npz written "
                "with np.savez, or an iterable of batches"
            )
        if not path.is_file():
            raise CalibrationError(f"calibration data file {path} does not exist")
        source = _stacked(_load_npz(path, specs), specs, str(path))
    elif _is_array(data):
        if len(specs) != 1:
            raise CalibrationError(
                f"calibration_data is one tensor but the graph takes {len(specs)} inputs "
                f"{[s.name for s in specs]}; give an iterable of tuples or dicts"
            )
        source = _stacked({specs[0].name: data}, specs, "calibration_data")
    elif isinstance(data, Iterable) and not isinstance(data, (Mapping, bytes)):
        source = data
    else:
        raise CalibrationError(
            f"calibration_data is a {type(data).__name__}; pass an iterable of batches (a DataLoader, "
            "a list of tensors, tuples or dicts), a stacked array, or a .npz path"
        )
    count = 0
    for index, batch in enumerate(source):
        if max_batches is not None and index >= max_batches:
            break
        yield index, check_batch(batch, index, specs)
        count += 1
    if count == 0:
        raise CalibrationError(
            "calibration_data yielded no batches; give at least one representative input batch "
            "(a few hundred samples is typical)"
        )


def expected_batches(data: Any, max_batches: int | None) -> int | None:
    """How many batches a run will take, when the data has a length (for the ETA)."""
    total = None
    if not isinstance(data, (str, os.PathLike)) and not _is_array(data):
        try:
            total = len(data)
        except TypeError:
            pass
    if total is None:
        return None
    return min(total, max_batches) if max_batches is not None else total


class Progress:
    """A plain-text progress line with ETA on stderr, shown only once a run passes ``delay_s``."""

    def __init__(self, total: int | None, enabled: bool = True, delay_s: float = 2.0, every_s: float = 1.0):
        self.total = total
        self.enabled = enabled
        self.delay_s = delay_s
        self.every_s = every_s
        self.start = time.perf_counter()
        self.last = 0.0
        self.shown = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = now - self.start
        if elapsed < self.delay_s or now - self.last < self.every_s:
            return
        self.last = now
        rate = done / elapsed
        if self.total:
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            text = f"calibrating: {done}/{self.total} batches, {rate:.1f} batch/s, ETA {eta:.0f} s"
        else:
            text = f"calibrating: {done} batches, {rate:.1f} batch/s"
        sys.stderr.write("\r" + text)
        sys.stderr.flush()
        self.shown = True

    def close(self, done: int) -> None:
        if self.shown:
            elapsed = time.perf_counter() - self.start
            sys.stderr.write(f"\rcalibrating: {done} batches in {elapsed:.1f} s" + " " * 20 + "\n")
            sys.stderr.flush()
