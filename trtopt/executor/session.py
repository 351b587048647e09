"""ONNX Runtime sessions on the CPU, and running graphs through them to measure them.

The executor (``cpu_session``, ``run_graph``, ``stream_tensors``) is the one way
trtopt runs a graph on the CPU to measure it: calibration, the FP16 keep-list's
probe, the accuracy readout and the budget search. It applies the FP16
emulation (``emulate_fp16``) in one place, so none of them can see different
FP16 values from the others or from the CPU backend (``backends.onnxruntime``,
which runs a compiled module on sessions made here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..errors import CalibrationError, ConfigError, EngineError, first_line
from ..graph import needs_external_data, save_model, serialize, weights_dir
from .fp16_emulation import emulate_fp16
from .lowbit_cpu import decode_fp4_weights, has_fp4_weights, has_int4_weights
from .profiling import LayerProfile, parse_onnxruntime_profile
from .qdq_cpu import is_cpu_layout, lower_qdq_for_cpu

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
    int4_accuracy_level: int | None = None,
    prepack: bool = True,
    peaks: Collection[str] = (),
) -> ort.InferenceSession:
    """An ONNX Runtime session for ``model``, computing what TensorRT computes from its Q/DQ.

    A Q/DQ graph is first laid out for the CPU's integer kernels where that is exact
    (``lower_qdq_for_cpu`` writes QLinearConv and MatMulIntegerToFloat itself). ONNX
    Runtime's own Q/DQ fusions stay off for graphs laid out for TensorRT: they also
    fuse where, on x86 CPUs without VNNI, its u8*s8 kernels sum pairs in 16 bits and
    saturate (a BERT-base-sized encoder read cosine 0.968 instead of 0.99995). A graph
    compiled with ``int8_layout="cpu"`` keeps them on: every code there is uint8 and
    every weight within +-63, so no pair sum can saturate, and they fuse the rest of
    the graph around the integer kernels (ResNet-18 at batch 8: 10% faster).
    ``optimized_model_path`` saves the graph ONNX Runtime actually runs.
    INT4 weights are folded into FP32 once (TensorRT's dequantise-then-GEMM numbers) unless
    ``int4_accuracy_level`` is given: then ONNX Runtime fuses them into ``MatMulNBits`` at that
    accuracy level (1: FP32 arithmetic, 4: int8 activations per block, the fastest; executor/lowbit_cpu.py).
    ``prepack=False`` (sessions that measure a few batches during compile) skips ONNX Runtime's
    packed copy of the weights: with the weights on disk the session then maps them from their
    file instead of holding a second copy (a 2.25 GiB model: 2.5 GiB less per session, created
    at once), and each call packs what it reads.
    ``peaks``: graph outputs reduced to scalars inside the session (``with_peaks``).
    """
    int4 = has_int4_weights(model)
    fusions_exact = is_cpu_layout(model) or (int4 and int4_accuracy_level is not None)
    if "CPUExecutionProvider" in providers:
        if has_fp4_weights(model):
            model = decode_fp4_weights(model)  # ONNX Runtime has no FP4 kernel on the CPU
        elif not int4:  # weight-only graphs hold no activation Q/DQ to lower (nor can gs write INT4)
            model = lower_qdq_for_cpu(model)
    if peaks:
        # After the lowering, which decides what to fuse from the graph outputs, as for any session.
        model = with_peaks(model, peaks)
    disabled = disabled_optimizers(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; ORT's warnings are about its own fusions
    options.add_session_config_entry("session.disable_quant_qdq", "0" if fusions_exact else "1")
    if int4 and int4_accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(int4_accuracy_level))
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if peaks:  # each reduction runs soon after the tensor it reads, which is then freed (with_peaks)
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    directory = weights_dir(model)
    if directory is not None:
        # The weights are on disk already (trtopt.graph.offload_weights): ONNX Runtime reads
        # them from there, and only the small proto goes through memory.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(directory))
    try:
        if directory is None and needs_external_data(model):
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
            serialize(model), options, providers=list(providers), disabled_optimizers=disabled
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


FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
)
Feeds = Mapping[str, np.ndarray]


class Observer(Protocol):
    """Digests one tensor's values batch by batch; ``update`` returns the batch's max |x|."""

    def update(self, values: np.ndarray) -> float: ...


# The latest plain session (the graph's own outputs) made inside ``reusing_sessions``: [key, model, session].
_LATEST_SESSION: ContextVar[list[Any] | None] = ContextVar("trtopt_latest_session", default=None)


@contextlib.contextmanager
def reusing_sessions() -> Iterator[None]:
    """Within this block (one compile), a graph loaded twice in a row is loaded into ONNX Runtime once.

    A compile runs the same graph object twice in a row with the same settings: the exported
    graph in the profile-shape check, then for the FP32 reference outputs; the FP16/INT8 graph
    in the accuracy readout, then as the CPU backend. ``cpu_session`` hands the second caller
    the first one's session (``InferenceSession.run`` is thread-safe and keeps no state
    between calls). Only the latest plain session of a graph held in memory is kept, and it is
    let go before any other session is made, so no more sessions are alive at once than without
    the reuse. Graphs are not changed in place after they are run (trtopt's passes return new graphs).
    """
    token = _LATEST_SESSION.set([])
    try:
        yield
    finally:
        _LATEST_SESSION.reset(token)


def cpu_session(
    model: onnx.ModelProto, intra_op_threads: int | None = None, outputs: Sequence[str] | None = None,
    int4_accuracy_level: int | None = None, prepack: bool = True, peaks: Collection[str] = (),
) -> ort.InferenceSession:
    """A CPU session computing what TensorRT computes: FP16 tensors rounded to FP16 (``emulate_fp16``;
    a graph without FP16 tensors runs as it is), Q/DQ as ``make_session`` lays it out.

    ``outputs`` replaces the graph's outputs. They are chosen after the emulation, because
    it leaves a tensor inside a fused INT8 kernel unrounded only while it is no graph output.
    Inside ``reusing_sessions``, the session just made for the same ``model`` object with the
    same settings is returned again. ``peaks``: see ``make_session``.
    """
    latest = _LATEST_SESSION.get()
    # The accuracy level only changes graphs with INT4 weights (make_session).
    level = int4_accuracy_level if has_int4_weights(model) else None
    key = (intra_op_threads, level)
    plain = outputs is None and not peaks
    if latest and plain and latest[0] == key and latest[1] is model:
        return latest[2]
    if latest is not None:
        latest.clear()  # let the previous session go before this one is made
    emulated = emulate_fp16(model)
    if outputs is not None:
        emulated = with_outputs(emulated, outputs)
    # Skipping the packed copy saves memory only where the weights are on disk (make_session); a graph
    # held in memory prepacks, as the module's own session does, so a measuring session may serve as it.
    prepack = prepack or weights_dir(model) is None
    session = make_session(
        emulated, intra_op_threads=intra_op_threads, int4_accuracy_level=int4_accuracy_level, prepack=prepack,
        peaks=peaks,
    )
    if latest is not None and plain and weights_dir(model) is None:
        # A graph whose weights are on disk is not held: its session would pin memory the size of its weights.
        latest[:] = [key, model, session]
    return session


def run_batches(model: onnx.ModelProto, feeds: Iterable[Feeds]) -> Iterator[list[np.ndarray]]:
    """The graph's outputs batch by batch (one list per batch, one array per output), in one
    session: what the readout and the budget compare, whatever each batch's shape."""
    session = cpu_session(model, prepack=False)  # a few batches: no packed copy of weights on disk
    names = [o.name for o in session.get_outputs()]
    return (session.run(names, dict(feed)) for feed in feeds)


def run_graph(model: onnx.ModelProto, feeds: Sequence[Feeds]) -> list[np.ndarray]:
    """The graph's outputs on every batch of ``feeds``, concatenated per output (along axis 0;
    0-d outputs are stacked). Batches whose outputs differ in shape beyond axis 0 cannot be
    concatenated: compare them batch by batch with ``run_batches``."""
    per_batch = list(run_batches(model, feeds))
    if not per_batch:
        return []
    try:
        return [np.concatenate([np.atleast_1d(b[i]) for b in per_batch]) for i in range(len(per_batch[0]))]
    except ValueError as exc:
        raise ConfigError(
            f"the outputs of these batches differ in shape beyond axis 0 ({exc}), so they cannot be "
            "concatenated; use run_batches to compare them batch by batch"
        ) from None


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every typed tensor of the graph by name (graph inputs and outputs win over value_info)."""
    graph = model.graph
    infos = {vi.name: vi for vi in graph.value_info}
    infos.update({vi.name: vi for vi in graph.output})
    infos.update({vi.name: vi for vi in graph.input})
    return infos


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are exactly ``names`` (ONNX Runtime then skips the rest)."""
    infos = value_infos(model)
    if any(n not in infos for n in names):
        infos = value_infos(onnx.shape_inference.infer_shapes(model))
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(infos[n] for n in names)
    return exposed


# The scalars ``with_peaks`` reduces each float tensor to, and how their names end.
PEAK_REDUCTIONS = {"::trtopt_max": "ReduceMax", "::trtopt_min": "ReduceMin", "::trtopt_l1": "ReduceL1"}
REDUCED_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def with_peaks(model: onnx.ModelProto, names: Collection[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs among ``names`` are each replaced, if FP32, FP16 or
    BF16, by three scalars reduced inside ONNX Runtime (``PEAK_REDUCTIONS``): max x, min x and
    sum |x|. Other outputs stay as they are.

    max |x| is max(max x, -min x). An Inf shows in max or min; a NaN only in sum |x| (ONNX
    Runtime's ReduceMax and ReduceMin do not propagate NaN: [1, nan, 2, -3] gives min 1), which
    an Inf or an overflowing sum makes +Inf, never NaN. No activation is copied out of the session:
    on a BERT-style encoder (138 activations, 371 MB a batch) the FP16 probe's pass over 6
    batches took 0.73 s instead of 0.86 s with each tensor streamed out to numpy. The tensors
    are computed as when they were graph outputs (bit for bit: tests/test_compile_cost.py): the
    reductions only read them, and a tensor with a second reader is no more fusable than a
    graph output. ``make_session`` runs such a graph in ONNX Runtime's priority-based order:
    in the default order the reductions ran last, holding every activation at once (the
    encoder's probe session grew by 494 MB instead of 140 MB); a node computes the same in
    any order.
    """
    wanted = set(names)
    reduced = onnx.ModelProto()
    reduced.CopyFrom(model)
    graph = reduced.graph
    kept, nodes = [], []
    for index, output in enumerate(model.graph.output):
        name = output.name
        if name not in wanted or output.type.tensor_type.elem_type not in REDUCED_TYPES:
            kept.append(output)
            continue
        if output.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:  # FP16/BF16 values are exact in FP32
            name = f"trtopt_peak_{index}_fp32"
            nodes.append(onnx.helper.make_node("Cast", [output.name], [name], name, to=onnx.TensorProto.FLOAT))
        for suffix, op in PEAK_REDUCTIONS.items():
            nodes.append(onnx.helper.make_node(op, [name], [output.name + suffix], f"trtopt_peak_{index}{suffix}",
                                               keepdims=0))
            kept.append(onnx.helper.make_tensor_value_info(output.name + suffix, onnx.TensorProto.FLOAT, []))
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(kept)
    return reduced


def _batch_peak(name: str, values: Mapping[str, np.ndarray]) -> float:
    """One batch's max |x| of ``name`` (``math.inf`` if it held Inf or NaN) from what the session
    returned: the tensor itself, or the three scalars ``with_peaks`` reduced it to."""
    if name in values:
        return _numpy_peak(values[name])
    high, low, l1 = (float(values[name + suffix]) for suffix in PEAK_REDUCTIONS)
    if math.isnan(l1):  # first: with a NaN, max and min are arbitrary
        return math.inf
    if high < low:  # an empty tensor: ReduceMax gives -inf, ReduceMin +inf (sum |x| is 0)
        return 0.0
    return max(high, -low) if math.isfinite(high) and math.isfinite(low) else math.inf


def _numpy_peak(values: np.ndarray) -> float:
    """max |x| of an array (``math.inf`` if it holds Inf or NaN): max(max x, -min x), two
    reductions without a temporary copy, through which Inf and NaN propagate."""
    values = np.asarray(values)
    if values.size == 0:
        return 0.0
    high, low = float(values.max()), float(values.min())
    return max(high, -low) if math.isfinite(high) and math.isfinite(low) else math.inf


def stream_tensors(
    model: onnx.ModelProto,
    names: Sequence[str],
    batches: Iterable[tuple[int, Feeds]],
    observers: Mapping[str, Observer],
    *,
    check: Callable[[str, float, int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    peaks: dict[str, float] | None = None,
) -> int:
    """Feed each of ``names`` (graph inputs or node outputs) into its observer, batch by batch.

    ``batches`` yields ``(index, feeds)``. Only the named tensors become outputs, and
    each goes straight into its observer and is dropped: while the observers digest
    batch k, ONNX Runtime already runs batch k+1 on a worker thread (both release
    the GIL), so at most two batches' activations are alive however many run.
    ONNX Runtime gets every core, even though the observers need one: on an idle 2-core
    machine, calibrating a BERT-style encoder and ResNet-18 took 0-24% less time that way than
    with one thread left to the observers, with the same ranges.
    ``check(name, batch_max, index)`` sees what each ``update`` returned (the
    calibrator rejects Inf there). ``on_batch(done)``
    follows each batch but the last. Returns the number of batches.

    ``peaks`` maps more tensors to max |x| over the batches (``math.inf`` once one held
    Inf or NaN), raised in place: those not observed are reduced inside the session
    (``with_peaks``), so the same pass measures them without copying them out.
    """
    measured: dict[str, float] = peaks if peaks is not None else {}
    inputs = {vi.name for vi in model.graph.input} - {t.name for t in model.graph.initializer}
    outputs = [n for n in names if n not in inputs]
    observed = set(outputs)
    reduced = [n for n in measured if n not in inputs and n not in observed]
    session = None
    if outputs or reduced:
        session = cpu_session(model, outputs=outputs + reduced, prepack=False, peaks=reduced)
    fed = {i.name for i in session.get_inputs()} if session is not None else set()
    returned = [o.name for o in session.get_outputs()] if session is not None else []

    def run(feeds: Feeds) -> list[Any]:
        return session.run(returned, {k: v for k, v in feeds.items() if k in fed}) if session is not None else []

    def observe(name: str, values: np.ndarray, index: int) -> None:
        batch_max = observers[name].update(values)
        if check is not None:
            check(name, batch_max, index)

    def digest(index: int, feeds: Feeds, future: Future[list[Any]]) -> None:
        for name in names:
            if name in inputs:
                observe(name, feeds[name], index)
        try:
            values = dict(zip(returned, future.result()))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CalibrationError(f"ONNX Runtime failed on calibration batch {index}: {exc}") from exc
        for name in outputs:
            observe(name, values[name], index)
        for name in measured:
            peak = _numpy_peak(feeds[name]) if name in inputs else _batch_peak(name, values)
            measured[name] = max(measured[name], peak)

    return _pipelined(batches, run, digest, on_batch)


def _pipelined(
    batches: Iterable[tuple[int, Feeds]],
    run: Callable[[Feeds], list[Any]],
    digest: Callable[[int, Feeds, Future[list[Any]]], None],
    on_batch: Callable[[int], None] | None,
) -> int:
    """Run batch k+1 on a worker thread while batch k is digested; returns the batches done."""
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trtopt-calibration") as pool:
        pending = None
        for index, feeds in batches:
            future = pool.submit(run, feeds)  # runs while the previous batch is digested
            if pending is not None:
                digest(*pending)
                done += 1
                if on_batch is not None:
                    on_batch(done)
            pending = (index, feeds, future)
        if pending is not None:
            digest(*pending)
            done += 1
    return done
