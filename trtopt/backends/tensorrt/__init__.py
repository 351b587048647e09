"""The TensorRT backend: ``build`` (ONNX -> serialized engine), ``runner`` (``TensorRTBackend``
runs an engine), ``engine_cache`` and ``trt_logging`` (TensorRT's logger bridge).

Code above the backends reaches it through ``trtopt.builder`` and ``trtopt.runtime``, its
public faces. docs/gpu.md.
"""
