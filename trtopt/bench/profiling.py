"""Per-layer profiles of a compiled module, attributed to torch modules, and their plots.

The backend does the timing (``executor.profiling.LayerProfiler``); this adds
the torch module path of each layer, read from the module's ONNX graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..executor.session import profile_graph
from ..executor.profiling import LayerProfile, LayerProfiler, LayerTime
from ..errors import ConfigError
from ..module import select_profile
from ..names import layer_module, node_modules, tensor_producers


def attribute_modules(profile: LayerProfile, onnx_model: Any) -> LayerProfile:
    """``profile`` with each layer's torch module path, read from ``onnx_model``'s node metadata.

    A layer is attributed to the first node of the graph it names: ONNX Runtime
    names a fused node after its first node, TensorRT a fused layer ``a + b``
    (``trtopt.names.layer_module``).
    """
    modules = node_modules(onnx_model)
    if not modules:
        return profile
    producers = tensor_producers(onnx_model)
    layers = [
        LayerTime(layer.name, layer.op_type, layer.ms, layer_module(layer.name, modules, producers, layer.op_type))
        for layer in profile.layers
    ]
    return LayerProfile(backend=profile.backend, runs=profile.runs, layers=layers)


def profile_layers(module: Any, inputs: Sequence[torch.Tensor], *, runs: int = 10) -> LayerProfile:
    """Where the time of one inference of ``module`` goes, per layer, on the backend it runs on.

    The backend times its layers (``executor.profiling.LayerProfiler``): ONNX
    Runtime per node of its optimised graph (the mean per run, one warm-up run
    dropped), TensorRT per fused layer (the median, from its ``IProfiler``).
    Each layer is then attributed to the torch module it came from.
    """
    backend = module.backend
    if not isinstance(backend, LayerProfiler):
        raise ConfigError(f"the module's backend ({type(backend).__name__}) cannot profile its layers")
    feeds = {t.name: x for t, x in zip(module.spec.inputs, inputs)}
    index = select_profile(module.profiles, {n: tuple(x.shape) for n, x in feeds.items()})
    return attribute_modules(backend.layer_profile(module.onnx_model, feeds, index, runs), module.onnx_model)


def profile_onnxruntime(module: Any, inputs: Sequence[torch.Tensor], *, runs: int = 10) -> LayerProfile:
    """Per-node times of ``module``'s graph under ONNX Runtime's profiler (one warm-up run dropped).

    Whatever backend the module runs on: a TensorRT module's graph can be
    profiled on the CPU too.
    """
    feeds = {t.name: x for t, x in zip(module.spec.inputs, inputs)}
    return attribute_modules(profile_graph(module.onnx_model, feeds, runs), module.onnx_model)


def profile_tensorrt(module: Any, inputs: Sequence[torch.Tensor], *, runs: int = 10) -> LayerProfile:
    """Per-layer median times of a TensorRT-backed module, from TensorRT's ``IProfiler``.

    ``profile_layers`` for a module that must run on TensorRT. The runtime
    profiles on a separate execution context (``profile_layers``); each layer's
    type comes from the engine inspector (``layer_information``), which names
    types only when the engine was built with detailed profiling verbosity
    ("?" otherwise). Layer names are TensorRT's, after fusion.
    """
    # The name promises TensorRT's timings: refuse another backend rather than quietly profile it.
    if module.backend_name != "tensorrt":
        raise ConfigError(
            f"the module runs on {module.backend_name}; compile or load it with backend='tensorrt' "
            "(or use profile_onnxruntime)"
        )
    return profile_layers(module, inputs, runs=runs)


def plot_layer_profile(profile: LayerProfile, count: int = 12):
    """Bar charts: time per op type and the slowest layers (named by module path and op); and, when the
    layers carry module paths, time per top-level module and per leaf module. Returns the figure."""
    import matplotlib.pyplot as plt  # the bench extra: only plotting needs it

    with_modules = any(layer.module is not None for layer in profile.layers)
    rows = 2 if with_modules else 1
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.5 * rows), squeeze=False)
    left, right = axes[0]
    ops = profile.by_op_type()[:count]
    left.barh([op for op, _ in ops][::-1], [ms for _, ms in ops][::-1], color="tab:blue")
    left.set(xlabel="ms per run", title=f"time per op type ({profile.backend})")
    top = profile.top_layers(count)
    right.barh([_short(f"{t.name} ({t.op_type})") for t in top][::-1], [t.ms for t in top][::-1], color="tab:orange")
    right.set(xlabel="ms per run", title=f"slowest {len(top)} layers")
    if with_modules:
        for ax, depth, title, color in (
            (axes[1][0], 1, "time per top-level module", "tab:green"),
            (axes[1][1], None, f"slowest {count} leaf modules", "tab:purple"),
        ):
            totals = profile.by_module(depth)[:count]
            ax.barh([_short(name) for name, _ in totals][::-1], [ms for _, ms in totals][::-1], color=color)
            ax.set(xlabel="ms per run", title=title)
    fig.tight_layout()
    return fig


def _short(label: str, width: int = 48) -> str:
    """Keep the end of a long label: a module path's last parts say the most."""
    return label if len(label) <= width else "..." + label[-(width - 3):]
