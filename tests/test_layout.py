"""The package's layout rules, checked on the source with ``ast``.

An underscore name is private to the module that defines it: nothing else in
trtopt/ may import it (``from .x import _y``) or reach for it on an imported
module (``x._y``). A name another module needs is public in its home.
"""

from __future__ import annotations

import ast
from pathlib import Path

# This checkout's source, whichever trtopt is installed.
PACKAGE = Path(__file__).resolve().parent.parent / "trtopt"

# Package-private *modules* may be imported by name inside the package: ``_deps``
# is the one boundary to the optional dependencies and ``_version`` the one
# version string; their underscore keeps them out of the public API, not out of
# the package. Their own underscore *names* stay private like any other.
PACKAGE_PRIVATE_MODULES = {"_deps", "_version"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_private_part(name: str) -> bool:
    return _is_private(name) and name not in PACKAGE_PRIVATE_MODULES


def _from_package(node: ast.ImportFrom) -> bool:
    # Third-party internals (torch._dynamo, ...) are another question; this rule is about trtopt's own.
    return node.level > 0 or (node.module or "").split(".")[0] == "trtopt"


def _package_aliases(tree: ast.Module) -> set[str]:
    """Local names bound by imports from trtopt (modules, and anything else imported from it)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname or a.name for a in node.names if a.name.split(".")[0] == "trtopt")
        elif isinstance(node, ast.ImportFrom) and _from_package(node):
            aliases.update(a.asname or a.name for a in node.names)
    return aliases


def _private_imports(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _from_package(node):
            module = node.module or ""
            if any(_is_private_part(part) for part in module.split(".")):
                found.append(f"line {node.lineno}: from {'.' * node.level}{module} import ...")
            found += [f"line {node.lineno}: imports {a.name}" for a in node.names if _is_private_part(a.name)]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "trtopt" and any(_is_private_part(p) for p in parts):
                    found.append(f"line {node.lineno}: import {alias.name}")
    return found


def _private_attribute_uses(tree: ast.Module) -> list[str]:
    aliases = _package_aliases(tree)
    return [
        f"line {node.lineno}: {node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and _is_private(node.attr)
    ]


def test_no_module_uses_another_modules_private_names():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for offence in _private_imports(tree) + _private_attribute_uses(tree):
            offences.append(f"{path.relative_to(PACKAGE.parent)} {offence}")
    assert not offences, "private names used across modules:\n" + "\n".join(offences)


def test_the_checker_catches_both_forms():
    # The rule must not pass vacuously: each form of the offence is reported.
    source = (
        "from .module import _TABLE\n"
        "from . import graph\n"
        "x = graph._helper\n"
        "from . import _deps\n"  # allowed: a package-private module
        "y = _deps._cache\n"  # ... but not its private names
        "import torch\n"
        "z = torch._C\n"  # third-party: not this rule
    )
    tree = ast.parse(source)
    assert _private_imports(tree) == ["line 1: imports _TABLE"]
    assert _private_attribute_uses(tree) == ["line 3: graph._helper", "line 5: _deps._cache"]


LONGEST_FUNCTION = 80  # lines, decorators and docstring included


def test_every_function_is_shorter_than_the_limit() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = node.end_lineno - first + 1
                if length >= LONGEST_FUNCTION:
                    too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "split these functions: " + "; ".join(too_long)
