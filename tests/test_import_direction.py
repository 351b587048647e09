"""Data flows down the package's floors only: a module imports from its own floor or below.

Checked on the source with ``ast``, every import counted: at the top, inside a
function (deferring an import does not remove the dependency) or under
``TYPE_CHECKING``. docs/design.md (section 2, "Layout") states the same rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

# This checkout's source, whichever trtopt is installed.
PACKAGE = Path(__file__).resolve().parent.parent / "trtopt"

# The floors, lowest first. An entry names a module or a package (then it covers everything in
# it); the most specific entry wins. Every module must be covered, so a new one needs a floor.
FLOORS: list[tuple[str, set[str]]] = [
    # Settings, specs, errors and small helpers that need nothing else from trtopt.
    ("ground", {"trtopt.errors", "trtopt.config", "trtopt.profiles", "trtopt.spec", "trtopt.files", "trtopt._version",
                "trtopt.stages", "trtopt.metrics"}),
    # The ONNX graph: torch -> ONNX, cleanup, the torch module paths on its nodes.
    ("graph", {"trtopt.graph", "trtopt.names", "trtopt.export"}),
    # ONNX Runtime sessions every pass runs graphs with (FP16 emulation, the CPU integer lowering).
    ("executor", {"trtopt.executor"}),
    # The passes that measure the graph and write its precision.
    ("passes", {"trtopt.calibrators", "trtopt.precision"}),
    # What runs a compiled graph; ``_deps`` is the TensorRT/pycuda boundary only the TensorRT backend
    # and backend selection use (it asks TensorRT's logger bridge whether a builder can be created).
    ("backends", {"trtopt.backends", "trtopt.builder", "trtopt.runtime", "trtopt._deps"}),
    # compile/load and the callable, with what a module writes of itself (``CompiledModule.export_onnx``
    # and ``export_triton`` are methods, so artifacts and triton sit on its floor).
    ("compiler", {"trtopt.compiler", "trtopt.module", "trtopt.artifacts", "trtopt.triton"}),
    # What users run: the public API, the command line, the harness, the server.
    ("apps", {"trtopt", "trtopt.__main__", "trtopt.cli", "trtopt.bench", "trtopt.serve", "trtopt.triton_python"}),
]
RANK = {name: rank for rank, (name, _) in enumerate(FLOORS)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    base = PACKAGE.parent.joinpath(*dotted.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def floor_of(module: str) -> str | None:
    """The floor of ``module``: the most specific entry naming it or a package above it."""
    best = None
    for floor, entries in FLOORS:
        for entry in entries:
            # The package root covers only itself; every other entry covers its submodules too.
            covers = module == entry or (entry != "trtopt" and module.startswith(entry + "."))
            if covers and (best is None or len(entry) > len(best[1])):
                best = (floor, entry)
    return best[0] if best else None


def imported_modules(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, trtopt module) for every import of the package in ``tree``."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "trtopt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "trtopt":
                continue
            for alias in node.names:  # ``from . import graph`` imports the module trtopt.graph
                found.append((node.lineno, f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base))
    return found


def upward_imports(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    here = RANK[floor_of(module) or "apps"]
    found = []
    for line, target in imported_modules(tree, module, is_package):
        floor = floor_of(target) or "apps"  # a module on no floor fails test_every_module_is_on_a_floor
        if RANK[floor] > here:
            found.append(f"line {line}: {target} ({floor})")
    return found


def _package_modules() -> list[tuple[str, ast.Module, bool]]:
    """Every module of the package: its dotted name, its parsed source, whether it is a package."""
    return [
        (_module_name(path), ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), path.name == "__init__.py")
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def test_imports_point_down_the_floors():
    offences = []
    for module, tree, is_package in _package_modules():
        offences += [f"{module} ({floor_of(module)}) {o}" for o in upward_imports(tree, module, is_package)]
    assert not offences, "imports from a higher floor:\n" + "\n".join(offences)


def test_the_checker_catches_upward_imports_in_every_form():
    # The rule must not pass vacuously: each form of an upward import is reported, and
    # imports from the same floor or below are not.
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .errors import GraphError\n"  # ground: below
        "from . import names\n"  # graph: its own floor
        "from .compiler import compile\n"  # line 4
        "import trtopt.cli\n"  # line 5
        "def f():\n"
        "    from .precision import to_fp16\n"  # line 7: deferred, still upward
        "if TYPE_CHECKING:\n"
        "    from .module import CompiledModule\n"  # line 9
    )
    assert upward_imports(ast.parse(source), "trtopt.graph", is_package=False) == [
        "line 4: trtopt.compiler (compiler)",
        "line 5: trtopt.cli (apps)",
        "line 7: trtopt.precision (passes)",
        "line 9: trtopt.module (compiler)",
    ]
    # Relative imports resolve from the importing package, and the most specific entry wins.
    assert upward_imports(ast.parse("from ..calibrators import calibrate\n"), "trtopt.executor.qdq_cpu", False) == [
        "line 1: trtopt.calibrators (passes)"
    ]


# Above the backends floor, the TensorRT backend is reached only through its public faces.
TENSORRT_INTERNALS = "trtopt.backends.tensorrt"
TENSORRT_FACES = {"trtopt.builder", "trtopt.runtime"}


def reaches_past_the_faces(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    if RANK[floor_of(module) or "apps"] <= RANK["backends"]:
        return []
    return [
        f"line {line}: {target}"
        for line, target in imported_modules(tree, module, is_package)
        if target == TENSORRT_INTERNALS or target.startswith(TENSORRT_INTERNALS + ".")
    ]


def test_code_above_the_backends_uses_the_tensorrt_faces():
    offences = []
    for module, tree, is_package in _package_modules():
        offences += [f"{module} {o}" for o in reaches_past_the_faces(tree, module, is_package)]
    assert not offences, f"import {sorted(TENSORRT_FACES)} instead:\n" + "\n".join(offences)
    source = "from .backends.tensorrt.build import build_engine\nfrom .builder import build_engine\n"
    assert reaches_past_the_faces(ast.parse(source), "trtopt.compiler", False) == [
        "line 1: trtopt.backends.tensorrt.build"
    ]
    assert reaches_past_the_faces(ast.parse(source), "trtopt.builder", False) == []  # the face itself


def test_every_module_is_on_a_floor():
    modules = [_module_name(path) for path in sorted(PACKAGE.rglob("*.py"))]
    unplaced = [m for m in modules if floor_of(m) is None]
    assert not unplaced, f"modules on no floor (add them to FLOORS in {Path(__file__).name}): {unplaced}"
    assert floor_of("trtopt.nonexistent") is None  # the root entry covers only the package itself
