"""What the shared fixtures (tests/conftest.py) and ``trtopt.bench.digits`` promise.

The trained-model cache hands every test module the weights it would have trained itself:
training must be reproducible, and a module's copy its own. Tests that train are in the
slow tier, others are not; the CLI's logging set-up does not outlive its test; an export
is the same with torch's op registry built once per session as with one built per export.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from tests import conftest
from tests.conftest import TrainedDigits, trtopt_logging_kept
from trtopt.bench import digits as digits_data
from trtopt.errors import DependencyError


def test_a_test_that_uses_a_trained_digits_model_is_marked_slow(request, trained_digits):
    assert request.node.get_closest_marker("slow") is not None


def test_other_tests_are_in_the_fast_tier(request, digits):
    assert request.node.get_closest_marker("slow") is None


def test_training_is_reproducible_and_each_caller_gets_its_own_copy(digits):
    small = digits_data.Digits(digits.train_x[:128], digits.train_y[:128], digits.test_x, digits.test_y)
    trained = TrainedDigits(small)
    first = trained.get(digits_data.DigitsMLP, epochs=1, encoding=digits_data.standardized_features)
    second = trained.get(digits_data.DigitsMLP, epochs=1, encoding=digits_data.standardized_features)
    assert first is not second
    assert all(a is not b for a, b in zip(first.parameters(), second.parameters()))
    with torch.no_grad():
        next(first.parameters()).zero_()  # changing one copy leaves the cached model alone
    third = trained.get(digits_data.DigitsMLP, epochs=1, encoding=digits_data.standardized_features)
    assert not torch.equal(next(first.parameters()), next(third.parameters()))
    # A second training from the same seed gives the same weights, so the cache changes no test.
    again = digits_data.train(digits_data.DigitsMLP, digits_data.standardized_features(small), epochs=1)
    for name, value in again.state_dict().items():
        assert torch.equal(value, third.state_dict()[name]), name


def test_load_digits_without_scikit_learn_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(DependencyError, match=r"scikit-learn.*pip install scikit-learn"):
        digits_data.load_digits()


def test_logging_changed_by_a_test_does_not_outlive_it():
    # cli.main removes its own handler now; the fixture still restores whatever a test leaves behind
    # (a handler on pytest's closed stream printed "I/O operation on closed file" in later tests).
    logger = logging.getLogger("trtopt")
    before = (list(logger.handlers), logger.level, logger.propagate)
    with trtopt_logging_kept():
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.DEBUG)
        logger.propagate = not before[2]
        assert logger.handlers != before[0] and logger.level == logging.DEBUG
    assert (list(logger.handlers), logger.level, logger.propagate) == before


def test_test_files_import_shared_helpers_not_each_other():
    """A helper one test file takes from another runs that file's module-level set-up and ties the two
    together; shared helpers live in tests/helpers.py, tests/trt_doubles.py or conftest fixtures."""
    tests_dir = Path(__file__).parent
    offenders = []
    for path in sorted(tests_dir.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
                if node.level and not node.module:  # from . import test_x
                    names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {name}" for name in names
                          if name.rsplit(".", 1)[-1].startswith("test_")]
    assert offenders == []


def test_an_xdist_worker_gets_its_share_of_the_cores(monkeypatch, request):
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    try:
        conftest.pytest_configure(request.config)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "8")
        conftest.pytest_configure(request.config)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_default_caches_are_private_to_the_test_session():
    from trtopt.precision.budget import default_cache_dir

    import os

    session_cache = Path(os.environ["XDG_CACHE_HOME"])
    assert session_cache.is_dir() and Path.home() / ".cache" not in session_cache.parents
    assert session_cache in default_cache_dir().parents
