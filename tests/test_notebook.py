"""The profiling notebook runs end to end (on the CPU here: ONNX Runtime backend).

It is committed executed (outputs from a CPU run, so a reader sees them without running it);
the test clears those outputs and executes it again.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "profiling.ipynb"


@pytest.mark.slow
def test_profiling_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel is a child process: it must import this checkout of trtopt.
    root = str(NOTEBOOK.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the PNGs
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    committed = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert all(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "commit the notebook executed: every code cell with its outputs"
    )
    assert not [o for o in committed if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in committed) >= 3
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "ms of kernel time per run" in text and "quantized: ['stem.0'" in text
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    for row in ("| torch-eager | fp32 |", "| trtopt | fp32 |", "| trtopt | fp16 |", "| trtopt | int8 |", "| trtopt | fp8 |"):
        assert f"| digits-cnn {row}" in markdown
    assert "| `block` |" in markdown  # time per top-level module
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # layers and modules, precisions, budget
