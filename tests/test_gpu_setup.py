"""The GPU tier's setup, checked on any machine: install extras, their documentation, and the rule
that tests/test_gpu.py compares separately built engines only at the FP32 tolerance (issue 15)."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from trtopt import _deps

ROOT = Path(__file__).resolve().parent.parent
TIGHT = 1e-3  # below this a comparison of two builds is flaky (TF32, tactic choice)


def gpu_extras() -> dict[str, list[str]]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {name: deps for name, deps in extras.items() if name.startswith("gpu")}


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_one_gpu_extra_per_cuda_major_version() -> None:
    extras = gpu_extras()
    assert sorted(extras) == ["gpu-cu12", "gpu-cu13"]
    for name, deps in extras.items():
        major = name.removeprefix("gpu-cu")
        names = {requirement_name(d) for d in deps}
        # The bare `tensorrt` package installs the CUDA 13 build: never in an extra.
        assert names == {f"tensorrt-cu{major}", "pycuda"}, (name, deps)


def test_docs_give_one_install_line_per_extra() -> None:
    text = (ROOT / "docs" / "gpu.md").read_text()
    lines = re.findall(r'^pip install "trtopt\[([^\]]+)\]"(.*)$', text, flags=re.MULTILINE)
    documented = [extra for extra, _ in lines]
    assert sorted(documented) == sorted(gpu_extras()), lines  # each extra once, no other install line
    for extra, comment in lines:
        assert f"CUDA {extra.removeprefix('gpu-cu')}" in comment, (extra, comment)


def test_install_hint_names_every_extra() -> None:
    for extra in gpu_extras():
        assert f"trtopt[{extra}]" in _deps.GPU_INSTALL_HINT


def _calls(node: ast.AST, names: set[str]) -> list[ast.Call]:
    found = []
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in names:
                found.append(call)
    return found


def _is_tight(call: ast.Call) -> bool:
    """assert_close/allclose without tolerances (defaults ~1e-6) or with rtol below TIGHT."""
    tolerances = {k.arg: k.value for k in call.keywords if k.arg in ("rtol", "atol")}
    rtol = tolerances.get("rtol")
    if rtol is None:
        return True
    return isinstance(rtol, ast.Constant) and float(rtol.value) < TIGHT


def test_gpu_tests_compare_separate_builds_only_at_the_fp32_tolerance() -> None:
    """A test that compiles two modules and compares them tightly must show they share one engine."""
    tree = ast.parse((ROOT / "tests" / "test_gpu.py").read_text())
    offenders = []
    for function in tree.body:
        if not (isinstance(function, ast.FunctionDef) and function.name.startswith("test_")):
            continue
        builds = len(_calls(function, {"compile"}))
        tight = [c for c in _calls(function, {"assert_close", "allclose"}) if _is_tight(c)]
        same_engine = "engine ==" in ast.unparse(function)
        if builds >= 2 and tight and not same_engine:
            offenders.append(function.name)
    assert offenders == []


def test_the_cuda_13_extra_needs_a_pycuda_that_builds_against_cuda_13() -> None:
    """Issue 26 item 10: pycuda before 2025.1.2 does not compile against CUDA 13's headers."""
    (pycuda,) = [d for d in gpu_extras()["gpu-cu13"] if requirement_name(d) == "pycuda"]
    floor = re.search(r">=\s*([\d.]+)", pycuda)
    assert floor and tuple(int(p) for p in floor.group(1).split(".")) >= (2025, 1, 2), pycuda
