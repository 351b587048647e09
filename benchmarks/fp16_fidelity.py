"""Which FP16 tensors a TensorRT engine really stores, against what trtopt's CPU emulation rounds.

The CPU backend emulates TensorRT's FP16 storage by rounding tensors to FP16
(``trtopt.executor.fp16_emulation``). Rounding costs a Cast pair per tensor, which is
most of why TensorRT-faithful INT8 is slower than FP32 on a CPU for MobileNetV3 and
transformers. This script builds the INT8 engines (FP16 float part) of cpu_speed.py's
MobileNetV3-small and transformer encoder and compares, per model, with the engine
inspector's listing (``check_against_engine``):

- ``rounded_not_stored``: tensors the emulation rounds that the engine never writes in
  FP16 (TensorRT fused them away): the emulation could skip them and stay faithful;
- ``stored_not_rounded``: tensors the engine writes in FP16 that the emulation does not
  round: a fidelity gap (tests/test_gpu.py fails on any).

Needs an NVIDIA GPU with TensorRT (``pip install "trtopt[gpu]"``):

    PYTHONPATH=. python benchmarks/fp16_fidelity.py    # writes benchmarks/results/fp16_fidelity.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_speed  # noqa: E402

import trtopt  # noqa: E402
from trtopt import _deps  # noqa: E402
from trtopt.executor.fp16_emulation import check_against_engine  # noqa: E402
from trtopt.files import atomic_write  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "fp16_fidelity.json"


def main() -> None:
    reason = _deps.tensorrt_unavailable_reason()
    if reason is not None:
        sys.exit(f"fp16_fidelity.py compares with real TensorRT engines, which need a GPU: {reason}")
    result = {}
    for name in ("mobilenet_v3_small", "transformer"):
        model, calibration, _, _ = cpu_speed.model_and_data(name)
        module = trtopt.compile(
            model, (calibration[:1],), precision="int8", calibration_data=list(calibration.split(8)),
            backend="tensorrt", dynamic_shapes={"x": {0: (1, 8, 8)}},
        )
        check = check_against_engine(module.onnx_model, module.backend.layer_information())
        producers = {out: node.op_type for node in module.onnx_model.graph.node for out in node.output}
        result[name] = {
            **check,
            # By producing op: e.g. Conv outputs fused with their hard-swish, MatMul outputs with their bias.
            "rounded_not_stored_by_op": dict(Counter(producers[t] for t in check["rounded_not_stored"])),
        }
        print(f"{name}: {len(check['rounded_not_stored'])} rounded but never stored in FP16 "
              f"{result[name]['rounded_not_stored_by_op']}; {len(check['stored_not_rounded'])} stored but not rounded")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(OUT, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
