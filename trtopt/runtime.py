"""The TensorRT runtime's public face: ``TensorRTBackend`` runs a serialized engine.

Same interface as ``backends.onnxruntime.OnnxRuntimeBackend`` (the ``Runner``
protocol). The implementation is ``trtopt.backends.tensorrt.runner``; docs/gpu.md.
"""

from .backends.tensorrt.runner import TensorRTBackend

__all__ = ["TensorRTBackend"]
