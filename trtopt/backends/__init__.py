"""Backends that run a compiled graph. Each has ``name`` and
``run(feeds, profile_index) -> list[torch.Tensor]`` (outputs in graph order);
input validation happens once, in ``trtopt.module.CompiledModule``."""

from .onnxruntime import OnnxRuntimeBackend

__all__ = ["OnnxRuntimeBackend"]
