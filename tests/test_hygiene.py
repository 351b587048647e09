"""Repository and test-harness hygiene: logging left as found, helpers that cannot pass vacuously,
the license file, no profiler traces in the tree."""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

import pytest
import torch

from tests.helpers import max_relative_error
from trtopt import cli

ROOT = Path(__file__).resolve().parents[1]


def test_cli_main_leaves_the_trtopt_logger_as_it_found_it(tmp_path, capsys):
    logger = logging.getLogger("trtopt")
    handlers, level = list(logger.handlers), logger.level
    assert cli.main(["inspect", str(tmp_path / "missing.trtopt")]) == 1
    assert "trtopt: error:" in capsys.readouterr().err
    # a handler left behind would hold pytest's captured stderr, closed after this test
    assert logger.handlers == handlers and logger.level == level


def test_max_relative_error_fails_on_a_missing_output():
    a, b = torch.ones(3), torch.full((3,), 2.0)
    assert max_relative_error((a, b), (a, b)) == 0.0
    with pytest.raises(AssertionError, match="1 output"):
        max_relative_error((a,), (a, b))
    with pytest.raises(AssertionError, match="2 output"):
        max_relative_error({"x": a, "y": b}, {"x": a})


def test_license_is_the_apache_2_text_pyproject_names():
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_onnxruntime_profiler_traces_stay_out_of_the_repository():
    patterns = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines() if line.strip()]
    trace = "onnxruntime_profile__2026-11-29_02-18-17_797.json"  # ONNX Runtime's default trace name
    assert any(fnmatch.fnmatch(trace, p) for p in patterns)
    assert not list(ROOT.glob("onnxruntime_profile_*.json"))


def test_layer_profiles_write_no_trace_into_the_working_directory(tmp_path, monkeypatch):
    from trtopt.executor.session import profile_graph

    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    monkeypatch.chdir(tmp_path)
    profile = profile_graph(model, {"x": torch.ones(2)}, runs=2)
    assert profile.layers and not list(tmp_path.iterdir())


def test_a_secret_file_is_never_readable_by_others(tmp_path, monkeypatch):
    # The serve ready file and launch file hold the server's access token: they must have their
    # mode when they appear under their name, not after a chmod that follows the rename.
    import os
    import stat

    from trtopt import files

    seen = []
    replace = os.replace

    def spying_replace(src, dst):
        seen.append(stat.S_IMODE(os.stat(src).st_mode))
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", spying_replace)
    path = files.atomic_write(tmp_path / "ready.json", '{"access_token": "x"}', mode=0o600)
    assert seen == [0o600] and stat.S_IMODE(path.stat().st_mode) == 0o600
    files.atomic_write(tmp_path / "plain.txt", "x")  # without a mode: what open() would give
    assert seen[1] == 0o666 & ~files._UMASK
