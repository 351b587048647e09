"""docs/design.md and the README describe the package as it is.

The design document's layout table has one row per module of ``trtopt/``; the
README's "Where things are" table names each package. A module added, moved or
removed without its row fails here, so the tables cannot drift from the tree.
The repository must also stand alone: no document outside it is cited.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "trtopt"
DESIGN = ROOT / "docs" / "design.md"
README = ROOT / "README.md"

# The backticked path in a table row's first column: "| `trtopt/x/y.py` | ... |".
ROW_PATH = re.compile(r"^\|\s*`([^`]+)`\s*\|", re.MULTILINE)


def _section(text: str, heading: str) -> str:
    """The body of the markdown section whose heading line contains ``heading``."""
    match = re.search(rf"^(#+) [^\n]*{re.escape(heading)}[^\n]*\n", text, re.MULTILINE)
    assert match, f"no section {heading!r}"
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(text, match.end())
    return text[match.end() : end.start() if end else len(text)]


def _modules() -> set[str]:
    return {path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py")}


def _packages() -> set[str]:
    return {path.parent.relative_to(ROOT).as_posix() + "/" for path in PACKAGE.rglob("__init__.py")}


def test_design_layout_lists_every_module_once():
    rows = [row for row in ROW_PATH.findall(_section(DESIGN.read_text(), "Layout")) if row.startswith("trtopt/")]
    duplicates = sorted({row for row in rows if rows.count(row) > 1})
    assert not duplicates, f"listed twice in docs/design.md: {duplicates}"
    missing = sorted(_modules() - set(rows))
    assert not missing, f"modules missing from docs/design.md's layout table: {missing}"
    stale = sorted(set(rows) - _modules())
    assert not stale, f"docs/design.md's layout table names modules that do not exist: {stale}"


def test_readme_points_at_the_design_doc_and_its_table_matches_the_tree():
    section = _section(README.read_text(), "where things are")
    assert "docs/design.md" in section
    named = ROW_PATH.findall(section)
    stale = sorted(p for p in named if not (ROOT / p).exists())
    assert not stale, f"README's table names paths that do not exist: {stale}"
    missing = sorted(_packages() - set(named))
    assert not missing, f"packages missing from README's table: {missing}"


def test_readme_names_every_top_level_module():
    row = next(line for line in _section(README.read_text(), "where things are").splitlines()
               if line.startswith("| `trtopt/` |"))
    named = set(re.findall(r"`(\w+)`", row))
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert not modules - named, f"top-level modules missing from README's trtopt/ row: {sorted(modules - named)}"
    assert not named - modules, f"README's trtopt/ row names modules that do not exist: {sorted(named - modules)}"


def test_the_checker_reads_table_rows_only():
    # The rule must not pass vacuously: rows count, backticked paths in prose do not.
    text = "## Layout\n\n| `trtopt/a.py` | x |\n|`trtopt/b/`| y |\nsee `trtopt/c.py`\n## Next\n| `trtopt/d.py` | z |\n"
    assert ROW_PATH.findall(_section(text, "Layout")) == ["trtopt/a.py", "trtopt/b/"]
    assert {"trtopt/", "trtopt/precision/"} <= _packages()


def test_no_document_outside_the_repository_is_cited():
    # A clone must stand alone: the design document is docs/design.md.
    pattern = re.compile(r"DESIGN\.md|\.\./shared|/work/shared")
    offences = []
    for folder in ("trtopt", "tests", "docs", "benchmarks", "tools"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md") and path != Path(__file__).resolve():
                offences += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                             if pattern.search(line)]
    offences += [f"README.md:{n}" for n, line in enumerate(README.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offences, "citations of a document outside the repository:\n" + "\n".join(offences)
