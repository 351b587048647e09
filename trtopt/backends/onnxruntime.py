"""The ONNX Runtime (CPU) runner: ``OnnxRuntimeBackend`` runs a compiled graph behind the ``Runner`` protocol.

``InferenceSession.run`` is documented as thread-safe, and ``OnnxRuntimeBackend``
keeps no per-call state, so one backend may serve several threads at once.

Sessions, FP16 emulation and the CPU integer lowering are the executor's
(``trtopt.executor``), which the passes use too; docs/design.md section 7.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..errors import EngineError
from ..executor.call_checks import check_embedding_indices, embedding_indices, run_failure
from ..executor.profiling import LayerProfile
from ..executor.session import cpu_session, make_session, profile_graph


class OnnxRuntimeBackend:
    """Backend over an ONNX Runtime session on the CPU.

    ``emulate_fp16=True`` (a compiled module's backend) rounds FP16 tensors as TensorRT stores
    them (see ``cpu_session``); without it ORT's CPU kernels compute most FP16 ops in FP32.
    """

    name = "onnxruntime"

    def __init__(
        self, model: onnx.ModelProto, intra_op_threads: int | None = None, *, emulate_fp16: bool = False,
        int4_accuracy_level: int | None = None,
    ) -> None:
        # int4_accuracy_level: run INT4 weights on ONNX Runtime's MatMulNBits (see make_session).
        self.int4_accuracy_level = int4_accuracy_level
        if emulate_fp16:
            self.session = cpu_session(model, intra_op_threads=intra_op_threads, int4_accuracy_level=int4_accuracy_level)
        else:
            self.session = make_session(model, intra_op_threads=intra_op_threads, int4_accuracy_level=int4_accuracy_level)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # numpy has no bfloat16: BF16 inputs go in as FP32 and BF16 outputs come out as FP32 holding
        # BF16 values (emulate_fp16 widens them), converted here, exactly, to and from torch.bfloat16.
        bf16 = onnx.TensorProto.BFLOAT16
        self._bf16_outputs = {o.name for o in model.graph.output if o.type.tensor_type.elem_type == bf16}
        if any(i.type.tensor_type.elem_type == bf16 for i in model.graph.input) and not emulate_fp16:
            raise EngineError("a graph with BF16 inputs runs on the CPU only with emulate_fp16=True")
        # Token ids are checked as eager checks them (ORT's Gather reads id -1 as the last row).
        self._embedding_indices = embedding_indices(model)
        # A failed kernel becomes run_failure's error; ORT's own log line of it would only repeat it.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4

    def run(self, feeds: Mapping[str, torch.Tensor], profile_index: int = 0) -> list[torch.Tensor]:
        """Run one batch. ``profile_index`` only matters to TensorRT; ORT takes any shape."""
        arrays = {
            name: _numpy_of(feeds[name])
            for name in self.input_names
        }
        outputs = self._run_arrays(arrays)
        return [
            torch.from_numpy(o).to(torch.bfloat16) if name in self._bf16_outputs else torch.from_numpy(o)
            for name, o in zip(self.output_names, outputs)
        ]

    def run_numpy(self, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch of arrays the caller has checked (``CompiledModule``'s fast path)."""
        return self._run_arrays(arrays)

    def _run_arrays(self, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self._embedding_indices:
            check_embedding_indices(self._embedding_indices, arrays)
        try:
            return self.session.run(self.output_names, arrays, self._run_options)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise run_failure(exc, arrays) from None

    def layer_profile(
        self, graph: onnx.ModelProto, feeds: Mapping[str, torch.Tensor], profile_index: int = 0, runs: int = 10
    ) -> LayerProfile:
        """Per-node times of ``graph`` under ONNX Runtime's profiler (``executor.profiling.LayerProfiler``).

        This backend's session was not built with profiling on (it slows every
        run), so the module's ``graph`` is profiled in a session of its own.
        """
        return profile_graph(graph, feeds, runs)


def _numpy_of(x: torch.Tensor) -> np.ndarray:
    """The tensor as a numpy array; a BF16 one as FP32 (exact), since numpy has no bfloat16."""
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.contiguous().numpy()
