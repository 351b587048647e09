"""Per-layer profiling: what a layer profile is, and the protocol a backend implements to give one.

``bench.profile_layers`` asks the module's backend for its profile through
``LayerProfiler`` instead of branching on the backend's name, so a new backend
only has to implement ``layer_profile``. The ONNX Runtime backend times the
nodes of ONNX Runtime's optimised graph from its profiler's trace
(``parse_onnxruntime_profile``); the TensorRT runtime times the engine's fused
layers with TensorRT's ``IProfiler`` and reads their types from the engine
inspector (``join_layer_types``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import InputError
from ..names import ROOT

if TYPE_CHECKING:
    import onnx
    import torch


@dataclass(frozen=True)
class LayerTime:
    name: str  # node (ONNX Runtime) or fused layer (TensorRT) name
    op_type: str
    ms: float  # per run: the mean over the profiled runs (ONNX Runtime) or the median (TensorRT)
    # The torch module path of the (first) node the layer runs, '' for the model itself; None when
    # the graph carries no module paths (an ONNX file, the TorchScript exporter, a module saved before).
    module: str | None = None


@dataclass
class LayerProfile:
    """Where the time of one inference goes, per layer."""

    backend: str
    runs: int
    layers: list[LayerTime]

    def per_run_ms(self) -> float:
        return sum(layer.ms for layer in self.layers)

    def by_op_type(self) -> list[tuple[str, float]]:
        """(op type, ms per run), slowest first."""
        totals: dict[str, float] = {}
        for layer in self.layers:
            totals[layer.op_type] = totals.get(layer.op_type, 0.0) + layer.ms
        return sorted(totals.items(), key=lambda kv: -kv[1])

    def top_layers(self, count: int = 10) -> list[LayerTime]:
        """The ``count`` slowest layers."""
        return sorted(self.layers, key=lambda layer: -layer.ms)[:count]

    def by_module(self, depth: int | None = None) -> list[tuple[str, float]]:
        """(torch module path, ms per run), slowest first.

        ``depth=None`` totals per leaf module (the module each layer's node came
        from, e.g. ``layer1.0.conv1``); ``depth=1`` per top-level module
        (``layer1``), ``depth=2`` one level below, and so on. The model's own ops
        (outside any submodule) are ``(root)``; layers without a module path
        are ``(unattributed)``: all of them for a graph without torch metadata,
        else the few a backend adds on its own (ONNX Runtime's layout reorders).
        """
        totals: dict[str, float] = {}
        for layer in self.layers:
            if layer.module is None:
                key = "(unattributed)"
            elif not layer.module:
                key = ROOT
            else:
                key = layer.module if depth is None else ".".join(layer.module.split(".")[:depth])
            totals[key] = totals.get(key, 0.0) + layer.ms
        return sorted(totals.items(), key=lambda kv: -kv[1])


@runtime_checkable
class LayerProfiler(Protocol):
    """A backend that can say where the time of one inference goes, per layer."""

    def layer_profile(
        self, graph: onnx.ModelProto, feeds: Mapping[str, torch.Tensor], profile_index: int, runs: int
    ) -> LayerProfile:
        """Per-layer times over ``runs`` runs of ``feeds`` (shaped for optimisation profile ``profile_index``).

        ``graph`` is the module's ONNX graph: a backend that profiles through a
        session of its own builds it from there; one that runs a built engine
        ignores it. Layers carry no module paths (``bench`` attributes them).
        """
        ...


def parse_onnxruntime_profile(events: Sequence[Mapping[str, Any]], skip_runs: int = 1) -> LayerProfile:
    """Aggregate an ONNX Runtime profiling trace (Chrome trace JSON) per node.

    Each ``model_run`` event spans one ``InferenceSession.run``; node events
    named ``<node>_kernel_time`` inside it carry the kernel's duration (µs) and
    its ``op_name``. The first ``skip_runs`` runs are warm-up and dropped; a
    node's time is its mean per kept run. Node names are those of ORT's
    optimised graph, so fused nodes (e.g. Conv+Relu as ``FusedConv``) appear
    once, under a name ORT chose.
    """
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    kept = runs[skip_runs:]
    if not kept:
        raise InputError(
            f"the ONNX Runtime trace holds {len(runs)} run(s); profile more than skip_runs={skip_runs}"
        )
    totals: dict[str, list[Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in kept):
            continue
        node = e["name"][: -len("_kernel_time")]
        entry = totals.setdefault(node, [e.get("args", {}).get("op_name", "?"), 0.0])
        entry[1] += e["dur"] / 1000.0
    layers = [LayerTime(name, op, total / len(kept)) for name, (op, total) in totals.items()]
    return LayerProfile(backend="onnxruntime", runs=len(kept), layers=layers)


def join_layer_types(medians: Sequence[tuple[str, float]], information: Mapping[str, Any], runs: int) -> LayerProfile:
    """TensorRT's per-layer median times joined with each layer's type from the engine inspector.

    The inspector names types only when the engine was built with detailed
    profiling verbosity; a layer it does not describe is of type "?".
    """
    op_types = {
        layer.get("Name", ""): str(layer.get("LayerType", "?"))
        for layer in information.get("Layers", [])
        if isinstance(layer, Mapping)
    }
    layers = [LayerTime(name, op_types.get(name, "?"), ms) for name, ms in medians]
    return LayerProfile(backend="tensorrt", runs=runs, layers=layers)
