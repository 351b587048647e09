"""The executor: ONNX Runtime sessions every pass runs graphs with (calibration, the FP16
keep-list's probe, the readout, the budget search), below ``precision/`` and ``calibrators/``.

``session`` makes sessions and runs/streams graphs; ``fp16_emulation`` rounds FP16 tensors as
TensorRT stores them; ``qdq_cpu`` and ``lowbit_cpu`` lay Q/DQ and 4-bit graphs out for ONNX
Runtime's CPU kernels; ``call_checks`` and ``profiling`` serve the CPU runner
(``backends.onnxruntime``) and the per-layer profile. docs/design.md section 7.
"""
