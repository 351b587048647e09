"""Fixtures shared by the test files.

- ``digits``: scikit-learn's digits (``trtopt.bench.digits``), loaded once per session.
- ``trained_digits``: models trained on them, each trained once per session and handed out
  as copies; ``digits_cnn`` and ``digits_transformer`` are the two most tests use. Training
  is seeded and single-threaded, so a test gets the same weights whichever test asked first.
- Every test that uses a trained digits model is marked ``slow`` (see
  ``pytest_collection_modifyitems``): ``pytest -m "not slow"`` is the fast tier.
- ``private_cache_home`` (autouse, session): ``$XDG_CACHE_HOME`` is a temporary directory.
- ``fake_trt``: TensorRT and pycuda replaced by the doubles of ``tests/trt_doubles.py``.
- ``restore_trtopt_logging`` (autouse): the ``trtopt`` logger as it was before each test.
- Under pytest-xdist (``make test``: ``-n 2 --dist loadfile``, a test file per worker, so its
  module-scoped fixtures are built once) each worker gets its share of torch's threads.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from tests.trt_doubles import FakeCuda, FakeTensorRT
from trtopt import _deps
from trtopt.bench.digits import Digits, DigitsCNN, DigitsTransformer, load_digits, train

TRAINED_DIGITS_FIXTURE = "trained_digits"


class TrainedDigits:
    """Models trained on the digits, each trained once and copied out, keyed by how it was trained."""

    def __init__(self, digits: Digits) -> None:
        self.digits = digits
        self._models: dict[tuple[object, ...], nn.Module] = {}

    def get(
        self,
        make_model: Callable[[], nn.Module],
        *,
        rows: bool = False,
        epochs: int = 8,
        encoding: Callable[[Digits], Digits] | None = None,
    ) -> nn.Module:
        """``train(make_model, encoding(digits), rows=rows, epochs=epochs)``, as a copy of its own.

        ``encoding`` is one of ``trtopt.bench.digits``' input encodings (``signed``, ...); a copy
        per call keeps a test that changes its model from changing anyone else's.
        """
        key = (make_model, rows, epochs, encoding)
        if key not in self._models:
            data = encoding(self.digits) if encoding else self.digits
            self._models[key] = train(make_model, data, rows=rows, epochs=epochs)
        return copy.deepcopy(self._models[key])


@pytest.fixture(scope="session")
def digits() -> Digits:
    return load_digits()


@pytest.fixture(scope="session")
def trained_digits(digits: Digits) -> TrainedDigits:
    return TrainedDigits(digits)


@pytest.fixture(scope="module")
def digits_cnn(trained_digits: TrainedDigits) -> nn.Module:
    """DigitsCNN trained for 8 epochs (about 98% top-1 on the held-out digits)."""
    return trained_digits.get(DigitsCNN, epochs=8)


@pytest.fixture(scope="module")
def digits_transformer(trained_digits: TrainedDigits) -> nn.Module:
    """DigitsTransformer trained for 10 epochs on rows of pixels (input ``digits.test_x[:, 0]``)."""
    return trained_digits.get(DigitsTransformer, rows=True, epochs=10)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Training and compiling a real model takes seconds; such tests belong to the slow tier.
    for item in items:
        if TRAINED_DIGITS_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist workers share the cores: each gets its share of torch's intra-op threads
    # instead of one thread per core each (which oversubscribes the CPU).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """trtopt's default caches (the budget's sensitivity cache) live in this session's directory, not
    ~/.cache: a cache left by an earlier run would change which path a test takes."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture()
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    """TensorRT and pycuda replaced by the doubles of tests/trt_doubles.py for one test."""
    fake = FakeTensorRT()
    monkeypatch.setattr(_deps, "tensorrt", lambda: fake)
    cuda = FakeCuda()
    monkeypatch.setattr(_deps, "cuda", lambda: cuda)
    return fake


@contextlib.contextmanager
def trtopt_logging_kept() -> Iterator[None]:
    """Put the ``trtopt`` logger's handlers, level and propagation back as they were on exit."""
    logger = logging.getLogger("trtopt")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)  # setLevel, not assignment: it also clears the loggers' cached levels
        logger.propagate = propagate


@pytest.fixture(autouse=True)
def restore_trtopt_logging() -> Iterator[None]:
    """The ``trtopt`` logger as it was before each test.

    ``trtopt.cli.main`` adds a handler on ``sys.stderr`` and sets a level; under pytest that
    stream is the test's capture, closed when the test ends, so every later log record would
    print a "Logging error" traceback, and the level would leak into later tests.
    """
    with trtopt_logging_kept():
        yield
