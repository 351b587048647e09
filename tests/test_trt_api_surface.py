"""Every TensorRT name backends/tensorrt/ (build.py, runner.py, trt_logging.py) and _deps.py use exists in TensorRT 10.x *and* 11.x.

The name lists in tests/data come from the real Python bindings published on
PyPI (tools/extract_trt_api.py imports them and walks ``dir()``); each holds
the names present in both the oldest and the newest release of its major
version. The checker reads our source with ``ast`` and attributes names so:

- attribute chains on the ``trt`` module (``trt.X.Y``, also ``self._trt.X``):
  ``X`` and ``X.Y``;
- attribute access on a variable whose name says which TensorRT object it
  holds (``RECEIVERS``: ``builder_config.set_flag`` -> ``IBuilderConfig.set_flag``;
  a leading underscore and ``self.``/``state.`` are ignored);
- methods defined in a class that subclasses ``trt.X``: ``X.method`` (the
  callbacks TensorRT calls by name: ``ILogger.log``, ``IProfiler.report_layer_time``);
- names probed with ``hasattr(trt..., "name")`` are feature-detected: they need
  only exist in one of the two versions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED_SOURCES = [ROOT / "trtopt" / "backends" / "tensorrt" / name for name in ("build.py", "runner.py")]

# Variable name -> the TensorRT class it holds, by the convention build.py and runner.py follow.
RECEIVERS = {
    "builder": "Builder",
    "network": "INetworkDefinition",
    "network_input": "ITensor",
    "parser": "OnnxParser",
    "parser_error": "ParserError",
    "builder_config": "IBuilderConfig",
    "trt_profile": "IOptimizationProfile",
    "timing_cache": "ITimingCache",
    "runtime": "Runtime",
    "cuda_engine": "ICudaEngine",
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
    "inspector": "EngineInspector",
}


# Callbacks TensorRT calls on a Python subclass *by name* that the bindings do not define on the
# base class, so ``dir()`` cannot list them: TensorRT's python/src/infer/pyCore.cpp, class
# PyOutputAllocator, looks up "reallocate_output", "reallocate_output_async" (optional, falls back
# to the former) and "notify_shape" with utils::getOverride / PYBIND11_OVERLOAD_PURE_NAME.
NAMED_CALLBACKS = {
    "IOutputAllocator.reallocate_output",
    "IOutputAllocator.reallocate_output_async",
    "IOutputAllocator.notify_shape",
}


def load_api(major: str) -> set[str]:
    path = ROOT / "tests" / "data" / f"tensorrt_api_{major}.txt"
    names = {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    return names | {n for n in NAMED_CALLBACKS if n.split(".")[0] in names}


def _terminal(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id.lstrip("_")
    if isinstance(node, ast.Attribute):
        return node.attr.lstrip("_")
    return None


def _trt_chain(node: ast.AST) -> list[str] | None:
    """``trt.A.B`` -> ["A", "B"]; None when the chain does not start at the trt module."""
    attrs: list[str] = []
    while isinstance(node, ast.Attribute):
        if _terminal(node) == "trt":  # self._trt
            return list(reversed(attrs))
        attrs.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "trt":
        return list(reversed(attrs))
    return None


def trt_names_used(source: str) -> tuple[set[str], set[str]]:
    """(names that must exist in both versions, names that are feature-detected with hasattr)."""
    tree = ast.parse(source)
    required: set[str] = set()
    guarded: set[str] = set()
    chain_parts: set[int] = set()  # inner Attribute nodes of a trt chain already counted
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr":
            target, name = node.args[0], node.args[1]
            chain = _trt_chain(target) if not (isinstance(target, ast.Name) and target.id == "trt") else []
            if chain is not None and isinstance(name, ast.Constant):
                guarded.add(".".join([*chain, name.value]))
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                chain = _trt_chain(base)
                if chain:
                    base_name = ".".join(chain)
                    for item in node.body:
                        if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                            required.add(f"{base_name}.{item.name}")
        elif isinstance(node, ast.Attribute) and id(node) not in chain_parts:
            chain = _trt_chain(node)
            if chain:
                inner = node.value
                while isinstance(inner, ast.Attribute):
                    chain_parts.add(id(inner))
                    inner = inner.value
                for i in range(1, len(chain) + 1):
                    if chain[i - 1].startswith("__") and chain[i - 1] != "__version__":
                        break
                    required.add(".".join(chain[:i]))
            elif _terminal(node.value) in RECEIVERS and not node.attr.startswith("_"):
                required.add(f"{RECEIVERS[_terminal(node.value)]}.{node.attr}")
    return required - guarded, guarded


def missing_names(source: str) -> dict[str, list[str]]:
    """For each major version, the names ``source`` uses that it lacks (feature-detected ones excepted)."""
    required, guarded = trt_names_used(source)
    apis = {major: load_api(major) for major in ("10", "11")}
    missing = {major: sorted(required - api) for major, api in apis.items()}
    missing["anywhere"] = sorted(n for n in guarded if not any(n in api for api in apis.values()))
    return missing


@pytest.mark.parametrize("path", CHECKED_SOURCES, ids=lambda p: p.name)
def test_every_tensorrt_name_we_use_exists_in_10_and_11(path: Path) -> None:
    required, _ = trt_names_used(path.read_text())
    assert len(required) >= 10, f"the checker found only {sorted(required)} in {path.name}"
    assert missing_names(path.read_text()) == {"10": [], "11": [], "anywhere": []}


def test_the_logger_bridge_uses_names_in_10_and_11() -> None:
    # The bridge is in trt_logging.py; too small for the ten-name floor above.
    source = (ROOT / "trtopt" / "backends" / "tensorrt" / "trt_logging.py").read_text()
    required, _ = trt_names_used(source)
    assert {"ILogger", "ILogger.log"} <= required
    assert missing_names(source) == {"10": [], "11": [], "anywhere": []}


def test_the_builder_probe_uses_names_in_10_and_11() -> None:
    # _deps creates the builder (whether one can be created says whether TensorRT runs here).
    source = (ROOT / "trtopt" / "_deps.py").read_text()
    required, _ = trt_names_used(source)
    assert "Builder" in required
    assert missing_names(source) == {"10": [], "11": [], "anywhere": []}


def test_every_receiver_convention_is_used() -> None:
    """The table stays honest: each variable name it relies on occurs in the checked code."""
    source = "\n".join(p.read_text() for p in CHECKED_SOURCES)
    tree = ast.parse(source)
    seen = {_terminal(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert set(RECEIVERS) <= seen, sorted(set(RECEIVERS) - seen)


def test_checker_catches_names_tensorrt_11_removed() -> None:
    snippet = """
network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
builder_config.set_flag(trt.BuilderFlag.FP16)
builder_config.int8_calibrator = calibrator
size = cuda_engine.device_memory_size
class Calibrator(trt.IInt8EntropyCalibrator2):
    def get_batch(self, names):
        return None
"""
    missing = missing_names(snippet)
    assert missing["11"] == [
        "BuilderFlag.FP16",
        "IBuilderConfig.int8_calibrator",
        "ICudaEngine.device_memory_size",
        "IInt8EntropyCalibrator2",
        "IInt8EntropyCalibrator2.get_batch",
        "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
    ]
    assert missing["10"] == []  # all of these were real in 10.x: the lists tell the versions apart


def test_checker_catches_misspelt_and_feature_detected_names() -> None:
    snippet = """
context.execute_async_v4(stream)
if hasattr(trt, "IProgressMonitor"):
    pass
if hasattr(trt, "IProgressMonitorr"):
    pass
"""
    missing = missing_names(snippet)
    assert missing["10"] == missing["11"] == ["IExecutionContext.execute_async_v4"]
    assert missing["anywhere"] == ["IProgressMonitorr"]
