"""What runs a compiled graph. Every runner follows ``runner.Runner``: ``name`` and
``run(feeds, profile_index) -> list[torch.Tensor]`` (outputs in graph order);
input validation happens once, in ``trtopt.module.CompiledModule``."""

from .onnxruntime import OnnxRuntimeBackend
from .runner import Runner

__all__ = ["OnnxRuntimeBackend", "Runner"]
