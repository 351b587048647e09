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

import itertools
import logging
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from ..errors import CalibrationError, ConfigError
from ..spec import conversion_hint

if TYPE_CHECKING:
    import torch

    from ..spec import TensorSpec

logger = logging.getLogger(__name__)

# The forms of ``calibration_data`` (and ``validation_data``) the module docstring lists, for type
# checkers; every batch is still checked at run time against the graph's inputs.
TensorOrArray: TypeAlias = "np.ndarray | torch.Tensor"
Batch: TypeAlias = "Mapping[str, TensorOrArray] | Sequence[TensorOrArray] | TensorOrArray"
CalibrationData: TypeAlias = "Iterable[Batch] | TensorOrArray | str | os.PathLike[str]"



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
    if isinstance(data, Batches):  # validated already
        yield from data.head(max_batches).indexed()
        return
    count = 0
    for index, batch in _raw_batches(data, specs):
        if max_batches is not None and index >= max_batches:
            break
        yield index, check_batch(batch, index, specs)
        count += 1
    if count == 0:
        _no_batches()


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


# ------------------------------------------------------------ data read more than once
#
# Compiling reads the calibration data several times (the held-back split, the FP16 probe and its
# Inf/NaN checks, calibration, SmoothQuant's statistics, the readout, the budget search). None of
# them may hold it in memory: a list or array the user passed is indexed where it lies, anything
# else (a DataLoader, a generator) is read once and spooled to disk, one .npy file per array, read
# back memory-mapped. Peak memory then does not grow with the number of batches.

HELD_BACK = 0.2  # share of the calibration batches held back to judge the module, by default
HELD_BACK_MAX_BATCHES = 32  # ... and at most this many batches (the readout and budget search run them all)


class Spool:
    """Lists of arrays written once to a temporary directory as .npy files, read back memory-mapped.

    The directory (under ``tempfile.gettempdir()``, so ``TMPDIR`` moves it) is deleted by
    ``close()`` or when the spool is garbage-collected, whichever comes first.
    """

    def __init__(self, prefix: str = "trtopt-spool-") -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=prefix))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.directory), ignore_errors=True)
        self._widths: list[int] = []  # arrays per entry

    def append(self, arrays: Sequence[np.ndarray]) -> None:
        """Store one entry (its arrays; entries may differ in length)."""
        index = len(self._widths)
        for k, array in enumerate(arrays):
            np.save(self.directory / f"{index}-{k}.npy", np.asarray(array), allow_pickle=False)
        self._widths.append(len(arrays))

    def __len__(self) -> int:
        return len(self._widths)

    def __getitem__(self, index: int) -> list[np.ndarray]:
        return [self._load(self.directory / f"{index}-{k}.npy") for k in range(self._widths[index])]

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        return (self[i] for i in range(len(self)))

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:  # an empty array cannot be memory-mapped
            return np.load(path, allow_pickle=False)

    def close(self) -> None:
        self._cleanup()


class Batches:
    """Validated calibration batches that may be read any number of times, never held in memory.

    Iterating yields ``{input name: ndarray}`` per batch, each read afresh: from the user's own
    list or array (validated on every read, cheap next to running a graph) or from a ``Spool``.
    ``labels()`` gives the labels of ``(inputs..., labels)`` batches, concatenated (None unless
    every batch has them). Made by ``open_batches``; ``head``/``tail`` are views over the same data.
    """

    def __init__(
        self,
        read: Callable[[int], tuple[dict[str, np.ndarray], np.ndarray | None]],
        indices: range,
        owner: Any = None,
    ) -> None:
        self._read, self.indices = read, indices
        self._owner = owner  # keeps a spool alive while any view of it is

    def __len__(self) -> int:
        return len(self.indices)

    def indexed(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        return ((i, self._read(i)[0]) for i in self.indices)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (feeds for _, feeds in self.indexed())

    def labels(self) -> np.ndarray | None:
        found = [self._read(i)[1] for i in self.indices]
        if not found or any(label is None for label in found):
            return None
        return np.concatenate([np.asarray(label).reshape(-1) for label in found])

    def head(self, count: int | None) -> Batches:
        return self if count is None or count >= len(self) else Batches(self._read, self.indices[:count], self._owner)

    def tail(self, count: int) -> Batches:
        return Batches(self._read, self.indices[len(self) - count:], self._owner)

    def close(self) -> None:
        """Delete the spool behind these batches now (views of it become unreadable)."""
        if isinstance(self._owner, Spool):
            self._owner.close()


def labels_of(batch: Any, n_inputs: int) -> np.ndarray | None:
    """The item after the inputs in a ``(inputs..., labels)`` tuple, else None."""
    if isinstance(batch, (tuple, list)) and len(batch) == n_inputs + 1:
        label = batch[-1]
        return label.detach().cpu().numpy() if hasattr(label, "detach") else np.asarray(label)
    return None


def _stacked_source(data: Any, specs: Sequence[TensorSpec]) -> list[dict[str, Any]] | None:
    """The batches of a .npz path or a stacked array (views, no copies); None for other data."""
    if isinstance(data, (str, os.PathLike)) or _is_array(data):
        return [batch for _, batch in _raw_batches(data, specs)]
    return None


def _raw_batches(data: Any, specs: Sequence[TensorSpec]) -> Iterator[tuple[int, Any]]:
    """``(index, batch as given)`` over the accepted forms of calibration data, checking the form only."""
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
        return enumerate(_stacked(_load_npz(path, specs), specs, str(path)))
    if _is_array(data):
        if len(specs) != 1:
            raise CalibrationError(
                f"calibration_data is one tensor but the graph takes {len(specs)} inputs "
                f"{[s.name for s in specs]}; give an iterable of tuples or dicts"
            )
        return enumerate(_stacked({specs[0].name: data}, specs, "calibration_data"))
    if isinstance(data, Iterable) and not isinstance(data, (Mapping, bytes)):
        return enumerate(data)
    raise CalibrationError(
        f"calibration_data is a {type(data).__name__}; pass an iterable of batches (a DataLoader, "
        "a list of tensors, tuples or dicts), a stacked array, or a .npz path"
    )


def open_batches(data: Any, specs: Sequence[TensorSpec], max_batches: int | None = None) -> Batches:
    """``data`` (any accepted form) as ``Batches``, at most ``max_batches`` of them.

    A list, tuple, stacked array or .npz file is indexed where it lies. Any other iterable
    (a DataLoader, a generator) is read exactly once, as before, and its validated batches are
    spooled to disk, so every later pass sees the very same batches and memory stays flat.
    """
    if isinstance(data, Batches):
        return data.head(max_batches)
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise CalibrationError(f"max_batches={max_batches!r} must be a positive integer or None")
    n_inputs = len(specs)
    listed = _stacked_source(data, specs)
    if listed is None and isinstance(data, (list, tuple)):
        listed = list(data)
    if listed is not None:
        count = len(listed) if max_batches is None else min(len(listed), max_batches)
        if count == 0:
            _no_batches()

        def read(i: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
            return check_batch(listed[i], i, specs), labels_of(listed[i], n_inputs)

        return Batches(read, range(count))
    spool = Spool()
    try:
        for index, batch in itertools.islice(_raw_batches(data, specs), max_batches):
            feeds = check_batch(batch, index, specs)
            label = labels_of(batch, n_inputs)  # spooled after the inputs when the batch has one
            spool.append([*(feeds[s.name] for s in specs), *([] if label is None else [label])])
    except BaseException:
        spool.close()
        raise
    if len(spool) == 0:
        spool.close()
        _no_batches()
    names = [s.name for s in specs]

    def read_spooled(i: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        arrays = spool[i]
        return dict(zip(names, arrays)), arrays[n_inputs] if len(arrays) > n_inputs else None

    logger.debug("calibration data spooled: %d batches in %s", len(spool), spool.directory)
    return Batches(read_spooled, range(len(spool)), owner=spool)


def feed_batches(
    data: Any, input_specs: Sequence[TensorSpec], max_batches: int | None = None
) -> tuple[Any, Callable[[], Iterator[dict[str, np.ndarray]]]]:
    """Re-iterable ONNX Runtime feeds from user calibration data (the calibrators' rules).

    Returns ``(data, batches)``: ``data`` as ``Batches`` (a one-shot
    iterator is read once and spooled to disk, since the calibrator and the passes each
    read the data), so pass the returned ``data`` on to ``calibrate``.
    """
    data = open_batches(data, input_specs, max_batches)
    return data, data.__iter__


def _no_batches() -> None:
    raise CalibrationError(
        "calibration_data yielded no batches; give at least one representative input batch "
        "(a few hundred samples is typical)"
    )


def held_back_count(batches: int) -> int:
    """How many of ``batches`` calibration batches are held back: a fifth, at least 1, at most the cap."""
    return min(HELD_BACK_MAX_BATCHES, max(1, round(batches * HELD_BACK)))


def batches_to_read(max_batches: int | None) -> int | None:
    """Calibration batches to read when ``max_batches`` are calibrated on: those plus the share held back."""
    if max_batches is None:
        return None
    return max_batches + min(HELD_BACK_MAX_BATCHES, max(1, round(max_batches * HELD_BACK / (1 - HELD_BACK))))


def split_validation(
    calibration_data: Any,
    validation_data: Any,
    input_specs: Sequence[TensorSpec],
    max_batches: int | None = None,
) -> tuple[Batches | None, Batches, np.ndarray | None]:
    """Return (batches to calibrate on, validation batches, validation labels or None).

    Without ``validation_data`` the last ``HELD_BACK`` share of the calibration batches is
    held back (at least one, at most ``HELD_BACK_MAX_BATCHES``), so the module is never judged
    on the batches the ranges were calibrated on. With ``max_batches`` (the calibration limit)
    only that many batches, plus the share held back, are read. Raises ConfigError when there
    is nothing to hold back.
    """
    if validation_data is not None:
        calibration = open_batches(calibration_data, input_specs, max_batches) if calibration_data is not None else None
        validation = open_batches(validation_data, input_specs)
        return calibration, validation, validation.labels()
    if calibration_data is None:
        raise ConfigError(
            "accuracy_budget needs data to judge the budget on: pass validation_data (or "
            "calibration_data, of which a fifth is held back)"
        )
    batches = open_batches(calibration_data, input_specs, batches_to_read(max_batches))
    if len(batches) == 1 and _stacked_source(calibration_data, input_specs) is not None:
        batches = _split_rows(batches, input_specs)
    if len(batches) < 2:
        raise ConfigError(
            f"accuracy_budget needs validation data: calibration_data has {len(batches)} batch(es), "
            "too few to hold one back; pass validation_data or more calibration batches"
        )
    held = held_back_count(len(batches))
    logger.info(
        "calibrating on %d batches; the last %d held back to measure the module against FP32",
        len(batches) - held, held,
    )
    validation = batches.tail(held)
    return batches.head(len(batches) - held), validation, validation.labels()


def _split_rows(batches: Batches, specs: Sequence[TensorSpec]) -> Batches:
    """One batch of a stacked array or .npz, with a dynamic batch dim: its last rows held back."""
    (only,) = batches
    rows = min(len(a) for a in only.values())
    dynamic_batch = all(spec.shape and not isinstance(spec.shape[0], int) for spec in specs)
    if not dynamic_batch or rows < 2:
        return batches
    cut = rows - max(1, round(rows * HELD_BACK))
    parts = [{n: a[:cut] for n, a in only.items()}, {n: a[cut:] for n, a in only.items()}]
    return Batches(lambda i: (parts[i], None), range(2))
