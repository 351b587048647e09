"""Run a compiled ONNX graph with ONNX Runtime on the CPU.

``InferenceSession.run`` is documented as thread-safe, and this class keeps no
per-call state, so one backend may serve several threads at once.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..errors import ConfigError, EngineError, first_line
from ..graph import EXTERNAL_DATA_THRESHOLD, initializer_bytes, save_model
from .profiling import LayerProfile, parse_onnxruntime_profile
from .qdq_cpu import lower_qdq_for_cpu

logger = logging.getLogger(__name__)


# ONNX Runtime quantizes the float weight of a Conv/Gemm that reads a DequantizeLinear, per tensor,
# with its own scale: that changes the numbers. trtopt decides every quantized weight itself.
DISABLED_OPTIMIZERS = ("WeightBiasQuantization", "QDQPropagationTransformer")
# ONNX Runtime (1.32) drops a Relu in front of a QuantizeLinear to FLOAT8E4M3FN with zero point 0
# ("ReluQuantRewrite"), as if the Q clipped at 0 as a uint8 one does; FP8 is signed, so negative
# values then pass through (a digits CNN fell to chance). Clip's twin rule is off for the same reason.
FP8_DISABLED_OPTIMIZERS = ("ReluQuantRewrite", "ClipQuantRewrite")


def disabled_optimizers(model: onnx.ModelProto) -> list[str]:
    """The ONNX Runtime graph rewrites that would change what ``model`` computes."""
    fp8 = any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer)
    return [*DISABLED_OPTIMIZERS, *(FP8_DISABLED_OPTIMIZERS if fp8 else ())]


def make_session(
    model: onnx.ModelProto,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int | None = None,
    profile_prefix: str | None = None,
    optimized_model_path: str | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session for ``model``, computing what TensorRT computes from its Q/DQ.

    A Q/DQ graph is first laid out for the CPU's integer kernels where that is exact
    (``lower_qdq_for_cpu`` writes QLinearConv and MatMulIntegerToFloat itself). ONNX
    Runtime's own Q/DQ fusions stay off: they also fuse where, on x86 CPUs without
    VNNI, its u8*s8 kernels sum pairs in 16 bits and saturate (a BERT-base-sized
    encoder read cosine 0.968 instead of 0.99995). ``optimized_model_path`` saves
    the graph ONNX Runtime actually runs, after its own rewrites.
    """
    if "CPUExecutionProvider" in providers:
        model = lower_qdq_for_cpu(model)
    disabled = disabled_optimizers(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; ORT's warnings are about its own fusions
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    try:
        if initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
            # Over protobuf's 2 GB limit the model must go through a file with external data;
            # the copy is deleted with the session.
            workdir = tempfile.mkdtemp(prefix="trtopt-ort-")
            path = save_model(model, Path(workdir) / "model.onnx")
            session = ort.InferenceSession(
                str(path), options, providers=list(providers), disabled_optimizers=disabled
            )
            weakref.finalize(session, shutil.rmtree, workdir, ignore_errors=True)
            return session
        return ort.InferenceSession(
            model.SerializeToString(), options, providers=list(providers), disabled_optimizers=disabled
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise EngineError(f"ONNX Runtime cannot load the graph: {first_line(exc)}") from exc


def profile_graph(model: onnx.ModelProto, feeds: Mapping[str, torch.Tensor], runs: int) -> LayerProfile:
    """Per-node times of ``model`` under ONNX Runtime's profiler over ``runs`` runs (one warm-up run dropped).

    Profiling is a session option, so this builds a session of its own; the
    trace file is deleted before returning.
    """
    if runs < 1:
        raise ConfigError(f"runs={runs}; profile at least 1 run")
    arrays = {name: x.detach().cpu().numpy() for name, x in feeds.items()}
    with tempfile.TemporaryDirectory(prefix="trtopt-profile-") as tmp:
        session = make_session(model, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(runs + 1):
            session.run(None, arrays)
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
    return parse_onnxruntime_profile(events, skip_runs=1)


class OnnxRuntimeBackend:
    """Backend over an ONNX Runtime session; CPU by default."""

    name = "onnxruntime"

    def __init__(self, model: onnx.ModelProto, intra_op_threads: int | None = None) -> None:
        self.session = make_session(model, intra_op_threads=intra_op_threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, torch.Tensor], profile_index: int = 0) -> list[torch.Tensor]:
        """Run one batch. ``profile_index`` only matters to TensorRT; ORT takes any shape."""
        arrays = {
            name: feeds[name].detach().cpu().contiguous().numpy()
            for name in self.input_names
        }
        try:
            outputs = self.session.run(self.output_names, arrays)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"ONNX Runtime failed to run the graph: {exc}") from exc
        return [torch.from_numpy(o) for o in outputs]

    def run_numpy(self, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch of arrays the caller has checked (``CompiledModule``'s fast path)."""
        try:
            return self.session.run(self.output_names, arrays)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"ONNX Runtime failed to run the graph: {exc}") from exc

    def layer_profile(
        self, graph: onnx.ModelProto, feeds: Mapping[str, torch.Tensor], profile_index: int = 0, runs: int = 10
    ) -> LayerProfile:
        """Per-node times of ``graph`` under ONNX Runtime's profiler (``backends.profiling.LayerProfiler``).

        This backend's session was not built with profiling on (it slows every
        run), so the module's ``graph`` is profiled in a session of its own.
        """
        return profile_graph(graph, feeds, runs)
