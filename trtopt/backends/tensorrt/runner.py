"""Run a serialized TensorRT engine: the ``tensorrt`` backend of ``CompiledModule``.

Same interface as ``backends.onnxruntime.OnnxRuntimeBackend``: ``run(feeds,
profile_index) -> list[torch.Tensor]`` in ``spec.outputs`` order. The module
has already checked names, dtypes, ranks and chosen the optimization profile
that holds the shapes; this class only moves data and runs. docs/gpu.md gives
what users see: CUDA tensors used in place on the caller's stream (a side stream
on the legacy default stream), numpy/CPU tensors through reused pinned buffers,
CUDA graphs, data-dependent output shapes, one execution context per thread,
and the event that orders launches of one context on different streams.

Implementation points the code depends on:
- TensorRT wants 256-byte aligned addresses (``ALIGNMENT``): a misaligned
  CUDA view is cloned.
- ``cuda_graph=True`` serves CUDA tensors, and CPU tensors when torch has CUDA.
  A set of shapes is captured after one plain launch (TensorRT does deferred
  set-up on the first launch after a shape change).
- Captures are serialised process-wide (``CAPTURE_LOCK``): ``torch.cuda.graph``
  empties the caching allocator on entry, which fails while another thread
  captures; only a failure of the capture itself marks an engine uncapturable.
  A graph's static tensors live on the caller's stream, where replays run; a
  replay on another stream ``record_stream``-s them there.
- ``infer_shapes`` checks the inputs against each other before any output
  shape is read (inputs each inside the profile but inconsistent are a
  ShapeError naming them).
- All pycuda work happens with the device's *primary* context pushed, the one
  torch and TensorRT's runtime API use, so device pointers are valid across the
  three. pycuda frees an allocation or a stream only with its context current
  or on the thread that retained it (anywhere else it warns and leaks), so a
  thread's buffers and stream are released explicitly with the context pushed:
  when its state is dropped (the thread ended), by ``close()``, and after
  ``profile_layers``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import statistics
import threading
import weakref
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ... import _deps
from ...executor.profiling import LayerProfile, join_layer_types
from .build import current_device_index
from ...errors import EngineError, InputError, ShapeError
from ...spec import NUMPY_TO_TORCH, TORCH_TO_NUMPY, TRT_TO_NUMPY, ModuleSpec
from .trt_logging import format_errors, tensorrt_logger

logger = logging.getLogger("trtopt.runtime")  # the public face's name

ALIGNMENT = 256  # bytes; TensorRT's requirement for I/O tensor addresses

# One CUDA-graph capture at a time in this process: torch.cuda.graph's __enter__ synchronises and
# empties torch's caching allocator, which fails while another thread is capturing.
CAPTURE_LOCK = threading.Lock()


def numpy_dtype_name(trt_dtype: Any) -> str:
    """The numpy dtype name of a ``trt.DataType`` (or an EngineError for types with no equivalent)."""
    name = getattr(trt_dtype, "name", str(trt_dtype))
    if name not in TRT_TO_NUMPY:
        raise EngineError(
            f"the engine has an input or output of TensorRT type {name}, which has no torch/numpy "
            "equivalent here (FP8/INT4/FP4 must stay inside the graph); cast it to float at the graph's edge"
        )
    return TRT_TO_NUMPY[name]


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    return NUMPY_TO_TORCH[numpy_dtype_name(trt_dtype)]


def engine_io(trt: ModuleType, cuda_engine: Any) -> tuple[dict[str, torch.dtype], dict[str, torch.dtype]]:
    """The engine's input and output tensors by name, with their torch dtypes."""
    inputs: dict[str, torch.dtype] = {}
    outputs: dict[str, torch.dtype] = {}
    for index in range(cuda_engine.num_io_tensors):
        name = cuda_engine.get_tensor_name(index)
        dtype = torch_dtype(cuda_engine.get_tensor_dtype(name))
        if cuda_engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            inputs[name] = dtype
        else:
            outputs[name] = dtype
    return inputs, outputs


def make_profiler(trt: ModuleType) -> Any:
    """Create a ``trt.IProfiler`` that collects each layer's time (ms) per run; never raises."""

    # trt is the tensorrt module, passed in (it has no stubs): mypy cannot resolve a base class read from it.
    class LayerTimes(trt.IProfiler):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.times: dict[str, list[float]] = defaultdict(list)

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            try:
                self.times[str(layer_name)].append(float(ms))
            except BaseException:  # noqa: BLE001 - nothing may propagate into TensorRT's C++
                pass

    return LayerTimes()


class OutputAllocations:
    """Memory and shapes of the data-dependent outputs of one launch (what the ``IOutputAllocator`` reports).

    ``start`` is called before each launch with ``allocate(name, nbytes) ->
    (address, owner)``; ``owner`` keeps the memory alive. Errors are kept in
    ``error`` rather than raised: they happen inside TensorRT's callbacks.
    """

    def __init__(self) -> None:
        self._allocate: Any = None
        self.buffers: dict[str, tuple[int, int, Any]] = {}  # name -> (address, nbytes, owner)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.error: str | None = None

    def start(self, allocate: Any) -> None:
        """Forget the last launch's outputs (they belong to its caller now) and allocate with ``allocate``."""
        self._allocate = allocate
        self.buffers, self.shapes, self.error = {}, {}, None

    def reallocate(self, name: str, size: int, alignment: int) -> int:
        try:
            size = max(int(size), 1)
            current = self.buffers.get(name)
            if current is not None and current[1] >= size and current[0] % max(int(alignment), 1) == 0:
                return current[0]
            address, owner = self._allocate(name, size)
            self.buffers[name] = (int(address), size, owner)
            return int(address)
        except Exception as exc:  # noqa: BLE001 - reported after the launch
            self.error = f"allocating {size} bytes for output {name!r} failed: {exc}"
            return 0

    def notify_shape(self, name: str, shape: Any) -> None:
        try:
            self.shapes[name] = tuple(int(d) for d in shape)
        except Exception as exc:  # noqa: BLE001
            self.error = f"reading the shape of output {name!r} failed: {exc}"


def make_output_allocator(trt: ModuleType, allocations: OutputAllocations) -> Any:
    """Create a ``trt.IOutputAllocator`` for outputs whose size TensorRT learns only while running.

    TensorRT calls ``reallocate_output_async`` (or ``reallocate_output``) with the
    bytes an output needs and ``notify_shape`` with its shape, both before
    ``execute_async_v3`` returns; the bindings' ``PyOutputAllocator`` looks the
    methods up by these names. They hand everything to ``allocations``; like
    every TensorRT callback they never raise into C++.
    """

    # trt is the tensorrt module, passed in (it has no stubs): mypy cannot resolve a base class read from it.
    class OutputAllocator(trt.IOutputAllocator):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.allocations = allocations

        def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int:
            return self.reallocate_output_async(tensor_name, memory, size, alignment, 0)

        def reallocate_output_async(
            self, tensor_name: str, memory: int, size: int, alignment: int, stream: int
        ) -> int:
            try:
                return self.allocations.reallocate(str(tensor_name), size, alignment)
            except BaseException:  # noqa: BLE001 - nothing may propagate into TensorRT's C++
                return 0

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            try:
                self.allocations.notify_shape(str(tensor_name), shape)
            except BaseException:  # noqa: BLE001
                pass

    return OutputAllocator()


class TorchCuda:
    """The slice of ``torch.cuda`` the device path uses, for one device.

    Kept in one small class so the device path reads plainly and so
    tests/trt_doubles.py can stand in for it on a machine without CUDA.
    """

    def __init__(self, device_index: int) -> None:
        self.device = torch.device("cuda", device_index)

    def available(self) -> bool:
        return torch.cuda.is_available()

    def is_device_tensor(self, tensor: torch.Tensor) -> bool:
        return tensor.is_cuda

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def copy(self, dest: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``dest.copy_(source)``, ordered on the current stream."""
        return dest.copy_(source)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def is_default_stream(self, stream: Any) -> bool:
        """The legacy default stream (handle 0), on which TensorRT synchronises the device."""
        return stream == torch.cuda.default_stream(self.device)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        """Tell the caching allocator ``tensor`` is used on ``stream`` (its block is reused only after that work)."""
        tensor.record_stream(stream)

    def new_stream(self) -> Any:
        return torch.cuda.Stream(self.device)

    def new_event(self) -> Any:
        return torch.cuda.Event()

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def capture(self, graph: Any, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local")

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


class BufferPool:
    """Device and pinned host buffers per tensor name, reused while large enough, grown otherwise."""

    def __init__(self, cuda: ModuleType) -> None:
        self._cuda = cuda
        self.device: dict[str, tuple[Any, int]] = {}
        self.host: dict[str, np.ndarray] = {}

    def device_buffer(self, name: str, nbytes: int) -> Any:
        current = self.device.get(name)
        if current is None or current[1] < nbytes:
            if current is not None:
                current[0].free()  # now, with the context current, rather than whenever it is collected
            size = max(nbytes, 1)
            self.device[name] = (self._cuda.mem_alloc(size), size)
        return self.device[name][0]

    def host_buffer(self, name: str, nbytes: int) -> np.ndarray:
        """A pinned uint8 view of exactly ``nbytes`` bytes."""
        current = self.host.get(name)
        if current is None or current.nbytes < nbytes:
            if current is not None:
                _free_pinned(current)
            current = self._cuda.pagelocked_empty(max(nbytes, 1), np.uint8)
            self.host[name] = current
        return current[:nbytes]

    def free(self) -> None:
        """Free every buffer now; the caller has the buffers' CUDA context current."""
        for allocation, _ in self.device.values():
            allocation.free()
        for array in self.host.values():
            _free_pinned(array)
        self.device.clear()
        self.host.clear()


def _free_pinned(array: np.ndarray) -> None:
    # pycuda.driver.pagelocked_empty returns an array whose .base owns the pinned memory.
    free = getattr(array.base, "free", None)
    if free is not None:
        free()


@contextlib.contextmanager
def pushed(primary_context: Any, cuda: ModuleType) -> Iterator[None]:
    """Make ``primary_context`` current in this thread for the block (pycuda's context stack)."""
    primary_context.push()
    try:
        yield
    finally:
        cuda.Context.pop()


@dataclass
class CapturedGraph:
    key: tuple[Any, ...]
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    stream: Any  # the torch stream whose pool the static tensors came from

    def static_tensors(self) -> list[torch.Tensor]:
        return [*self.inputs.values(), *self.outputs.values()]


class _CaptureNotStarted(Exception):
    """``torch.cuda.graph`` failed before the capture began: says nothing about the engine."""


class ExecutionState:
    """One execution context and what it runs with; used by one thread only.

    Holds pycuda objects, so it must be released with the primary context
    pushed: ``release()`` does that, and so does ``__del__`` when a thread ends
    and its thread-local state is dropped (on that thread, where pycuda would
    otherwise refuse to activate a context retained by another thread).
    """

    def __init__(self, context: Any, buffers: BufferPool, activate: Any) -> None:
        self.context = context
        self.buffers = buffers
        self.profile_index: int | None = None
        self.stream: Any = None  # pycuda stream, for host inputs
        self.graph: CapturedGraph | None = None
        self.side_stream: Any = None  # torch stream for launches when the caller is on the legacy default stream
        self.output_allocator: Any = None  # trt.IOutputAllocator for data-dependent outputs (TensorRT keeps a raw pointer)
        self.profiler: Any = None
        # The last launch's completion event (torch) and its stream's handle, while it may still run.
        self.pending_event: Any = None
        self.pending_stream: int | None = None
        self._event: Any = None
        self._activate = activate  # a context manager factory: the primary context pushed
        self.released = False

    def launched(self, stream: Any, new_event: Any) -> None:
        """Record that work on ``stream`` (a torch stream) uses this context."""
        if self._event is None:
            self._event = new_event()
        self._event.record(stream)
        self.pending_event, self.pending_stream = self._event, int(stream.cuda_stream)

    def completed(self) -> None:
        """All work of this context has finished (the caller synchronised its stream)."""
        self.pending_event, self.pending_stream = None, None

    def release(self) -> None:
        """Free the pycuda buffers and stream now, with the primary context pushed; idempotent."""
        if self.released:
            return
        self.released = True
        with self._activate():
            if self.pending_event is not None:
                self.pending_event.synchronize()  # never free memory a launch may still use
            if self.stream is not None:
                self.stream.synchronize()
            self.buffers.free()
            # Dropped here so their destructors run with the context current.
            self.stream = None
            self.graph = None
            self.side_stream = None
            self.context = None
            self.output_allocator = None
            self.pending_event = self._event = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception as exc:  # noqa: BLE001 - a finalizer must not raise
            logger.debug("could not release a TensorRT execution state: %s", exc)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _volume(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


class TensorRTBackend:
    """Backend over a deserialized TensorRT engine; see the module docstring for the rules."""

    name = "tensorrt"

    def __init__(
        self,
        engine: bytes,
        spec: ModuleSpec,
        *,
        cuda_graph: bool = False,
        allow_host_code: bool = False,
        device_index: int | None = None,
    ) -> None:
        self._trt = _deps.tensorrt()
        self._cuda = _deps.cuda()
        self.spec = spec
        self.cuda_graph = cuda_graph
        self.graph_unsupported = False  # set when a capture failed: the engine cannot be captured
        self.device_index = current_device_index() if device_index is None else device_index
        self._gpu = TorchCuda(self.device_index)
        self._primary_context = self._cuda.Device(self.device_index).retain_primary_context()
        self._bridge = tensorrt_logger(self._trt)
        with self.activated():
            self._runtime = self._trt.Runtime(self._bridge)
            if allow_host_code:  # version-compatible engines embed the lean runtime's host code
                self._runtime.engine_host_code_allowed = True
            with self._bridge.errors.capture() as errors:
                cuda_engine = self._runtime.deserialize_cuda_engine(bytes(engine))
        if cuda_engine is None:
            raise EngineError(
                f"TensorRT {self._trt.__version__} could not load this engine. An engine runs only "
                "with the TensorRT version that built it (unless built with version_compatible=True, "
                "which also needs allow_host_code=True here) and on the GPU model it was built for "
                "(unless built with hardware_compatibility). Rebuild it on this machine: compile "
                "again, or trtopt.load the module file, which rebuilds from the ONNX graph it holds. "
                + format_errors(errors, self._bridge.errors.recent)
            )
        self._engine = cuda_engine
        self.inputs, self.outputs = engine_io(self._trt, cuda_engine)
        self._check_spec()
        self.num_profiles = int(cuda_engine.num_optimization_profiles)
        self._output_order = [t.name for t in spec.outputs]
        self._local = threading.local()
        self._create_lock = threading.Lock()
        self._states: weakref.WeakSet[ExecutionState] = weakref.WeakSet()
        self.contexts_created = 0
        self.data_dependent = self._find_data_dependent_outputs()
        if self.data_dependent and cuda_graph:
            # TensorRT sizes these outputs during the launch, which a CUDA graph cannot replay.
            logger.info("CUDA graphs are off for this engine: outputs %s have data-dependent shapes", self.data_dependent)
            self.graph_unsupported = True

    # --------------------------------------------------------------- set-up
    def _check_spec(self) -> None:
        expected_in = {t.name: t.dtype for t in self.spec.inputs}
        expected_out = {t.name: t.dtype for t in self.spec.outputs}
        found_in = {n: TORCH_TO_NUMPY[d] for n, d in self.inputs.items()}
        found_out = {n: TORCH_TO_NUMPY[d] for n, d in self.outputs.items()}
        if found_in != expected_in or found_out != expected_out:
            raise EngineError(
                f"the engine's inputs {found_in} and outputs {found_out} do not match the module's "
                f"inputs {expected_in} and outputs {expected_out}; the engine was built from another "
                "model: rebuild it from this module's ONNX graph"
            )

    def _find_data_dependent_outputs(self) -> list[str]:
        """The outputs sized by input *values* (NonZero, NonMaxSuppression): they need an output allocator.

        Probed on this thread's first execution context (kept for its first
        call): a context that is the engine's first uses profile 0, and once
        every input has profile 0's opt shape, an output dim still -1 depends on
        input values.
        """
        if not self.spec.profiles:
            return []
        profile = self.spec.profiles[0]
        with self.activated():
            context = self._state().context
            for name in self.inputs:
                if not context.set_input_shape(name, tuple(profile[name].opt)):
                    return []  # not probeable here; a call still finds them (_output_shapes)
            return [name for name in self._output_order if any(int(d) < 0 for d in context.get_tensor_shape(name))]

    def activated(self) -> contextlib.AbstractContextManager[None]:
        """Make the device's primary CUDA context current in this thread for the block."""
        return pushed(self._primary_context, self._cuda)

    def _new_state(self, profiler: Any = None) -> ExecutionState:
        # Creating contexts is rare (once per thread); serialise it rather than rely on the engine.
        with self._create_lock, self._bridge.errors.capture() as errors:
            context = self._engine.create_execution_context()
            self.contexts_created += 1
        if context is None:
            raise EngineError(
                "TensorRT could not create an execution context (often: out of GPU memory). "
                + format_errors(errors)
            )
        # The state gets the context and pycuda, not the backend: no reference cycle delays its release.
        activate = functools.partial(pushed, self._primary_context, self._cuda)
        state = ExecutionState(context, BufferPool(self._cuda), activate)
        if profiler is not None:
            context.profiler = profiler
            state.profiler = profiler  # TensorRT holds only a raw pointer to it
        else:
            self._quiet_nvtx(context)
        with self._create_lock:
            self._states.add(state)
        return state

    def _quiet_nvtx(self, context: Any) -> None:
        # Engines are built with DETAILED profiling verbosity for the inspector and profile_layers;
        # at DETAILED, NVTX ranges carry every layer's details and TensorRT says that generally adds
        # enqueue latency. Layer names are enough to read an Nsight timeline.
        try:
            context.nvtx_verbosity = self._trt.ProfilingVerbosity.LAYER_NAMES_ONLY
        except Exception as exc:  # noqa: BLE001 - an engine built at a lower verbosity refuses it; harmless
            logger.debug("cannot lower the NVTX verbosity: %s", exc)

    def _state(self) -> ExecutionState:
        state = getattr(self._local, "state", None)
        if state is None or state.released:
            state = self._new_state()
            self._local.state = state
        return state

    def close(self) -> None:
        """Free every thread's execution context, buffers and stream now (the engine stays loaded).

        Call it when no other thread is running this module; a later call
        creates fresh state. Without it, a thread's state is freed when the
        thread ends and the rest when the backend is collected.
        """
        with self._create_lock:
            states = list(self._states)
        for state in states:
            state.release()

    # ------------------------------------------------------------------ run
    def run(self, feeds: Mapping[str, torch.Tensor], profile_index: int = 0) -> list[torch.Tensor]:
        """Run one batch with this thread's execution context; outputs in ``spec.outputs`` order."""
        with self.activated():
            return self._run(self._state(), feeds, profile_index)

    def _run(
        self,
        state: ExecutionState,
        feeds: Mapping[str, torch.Tensor],
        profile_index: int,
        use_graph: bool | None = None,
    ) -> list[torch.Tensor]:
        if not 0 <= profile_index < self.num_profiles:
            raise EngineError(
                f"optimization profile {profile_index} does not exist; the engine has {self.num_profiles}"
            )
        use_graph = self.cuda_graph if use_graph is None else use_graph
        use_graph = use_graph and not self.graph_unsupported
        on_device = any(self._gpu.is_device_tensor(t) for t in feeds.values())
        if on_device or (use_graph and self._gpu.available()):
            return self._run_device(state, feeds, profile_index, use_graph)
        return self._run_host(state, feeds, profile_index)

    def _select_profile(self, state: ExecutionState, profile_index: int, stream_handle: int) -> bool:
        """Switch the context's profile (queued on the stream); True when it switched."""
        if state.profile_index == profile_index:
            return False
        # The bindings raise RuntimeError when TensorRT refuses, and otherwise return True (pyCore.cpp).
        try:
            with self._bridge.errors.capture() as errors:
                state.context.set_optimization_profile_async(profile_index, stream_handle)
        except RuntimeError as exc:
            raise EngineError(
                f"TensorRT could not select optimization profile {profile_index} ({_one_line(exc)}). "
                + format_errors(errors, self._bridge.errors.recent)
            ) from exc
        state.profile_index = profile_index
        return True

    def _set_input(self, state: ExecutionState, name: str, shape: tuple[int, ...], address: int) -> None:
        with self._bridge.errors.capture() as errors:
            ok = state.context.set_input_shape(name, shape)
        if not ok:
            raise EngineError(
                f"TensorRT rejected shape {shape} for input {name!r} in profile {state.profile_index}. "
                + format_errors(errors)
            )
        self._set_address(state, name, address)

    def _set_address(self, state: ExecutionState, name: str, address: int) -> None:
        with self._bridge.errors.capture() as errors:
            ok = state.context.set_tensor_address(name, address)
        if not ok:
            raise EngineError(
                f"TensorRT rejected address {address:#x} for tensor {name!r} (it must be a device "
                f"address aligned to {ALIGNMENT} bytes). " + format_errors(errors)
            )

    def _output_shapes(
        self, state: ExecutionState, input_shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """The shapes of the outputs sized by the input shapes (data-dependent ones are left out).

        ``infer_shapes`` first: inputs each within the profile can still be
        inconsistent with each other, and then the output shapes read as -1.
        """
        described = ", ".join(f"{name}={tuple(shape)}" for name, shape in input_shapes.items())
        try:
            with self._bridge.errors.capture() as errors:
                unspecified = state.context.infer_shapes()  # raises RuntimeError on a failure (pyCore.cpp)
        except RuntimeError as exc:
            raise ShapeError(
                f"the input shapes {described} are each within optimization profile {state.profile_index} "
                "but inconsistent with each other (e.g. dimensions the model requires to be equal differ); "
                f"give inputs whose shapes fit together ({_one_line(exc)}). "
                + format_errors(errors, self._bridge.errors.recent)
            ) from exc
        if unspecified:
            raise EngineError(f"TensorRT reports input(s) {list(unspecified)} without a shape or address")
        shapes = {}
        for name in self._output_order:
            if name in self.data_dependent:
                continue
            shape = tuple(int(d) for d in state.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):  # found now rather than by the probe at creation
                self.data_dependent.append(name)
                self.graph_unsupported = True
                continue
            shapes[name] = shape
        return shapes

    def _prepare_output_allocator(self, state: ExecutionState, allocate: Any) -> OutputAllocations:
        """This state's output allocator, set on every data-dependent output, ready for one launch."""
        if state.output_allocator is None:
            state.output_allocator = make_output_allocator(self._trt, OutputAllocations())
        for name in self.data_dependent:  # every launch: one found only at call time joins the list
            with self._bridge.errors.capture() as errors:
                ok = state.context.set_output_allocator(name, state.output_allocator)
            if not ok:
                raise EngineError(f"TensorRT refused an output allocator for {name!r}. " + format_errors(errors))
        allocations: OutputAllocations = state.output_allocator.allocations
        allocations.start(allocate)
        return allocations

    def _allocated_outputs(self, allocations: OutputAllocations) -> dict[str, tuple[tuple[int, ...], Any]]:
        """After a launch: each data-dependent output's shape and the owner of its memory."""
        if allocations.error is not None:
            raise EngineError(f"TensorRT's output allocation failed: {allocations.error}")
        found = {}
        for name in self.data_dependent:
            if name not in allocations.shapes or name not in allocations.buffers:
                raise EngineError(f"TensorRT did not report the shape or memory of data-dependent output {name!r}")
            found[name] = (allocations.shapes[name], allocations.buffers[name][2])
        return found

    def _execute(self, state: ExecutionState, stream_handle: int) -> None:
        with self._bridge.errors.capture() as errors:
            ok = state.context.execute_async_v3(stream_handle)
        if not ok:
            raise EngineError("TensorRT failed to run the engine. " + format_errors(errors, self._bridge.errors.recent))

    # ------------------------------------------------------- stream ordering
    def _wait_for_last_launch(self, state: ExecutionState, stream: Any) -> None:
        """Order this context's next use on torch ``stream`` after its previous launch on another stream."""
        if state.pending_event is not None and state.pending_stream != int(stream.cuda_stream):
            stream.wait_event(state.pending_event)

    def _finish_last_launch(self, state: ExecutionState) -> None:
        """Before the host path's pycuda stream uses the context: wait for a device-path launch (host side)."""
        if state.pending_event is not None:
            state.pending_event.synchronize()
            state.completed()

    # ------------------------------------------------------- host (pycuda) path
    def _run_host(
        self, state: ExecutionState, feeds: Mapping[str, torch.Tensor], profile_index: int
    ) -> list[torch.Tensor]:
        if state.stream is None:
            state.stream = self._cuda.Stream()
        # This path blocks at its end anyway, so waiting on the host costs nothing extra.
        self._finish_last_launch(state)
        try:
            return self._host_launch(state, feeds, profile_index)
        except BaseException:
            # A call that fails part-way leaves no copy queued into buffers the next call may free.
            state.stream.synchronize()
            raise

    def _host_launch(
        self, state: ExecutionState, feeds: Mapping[str, torch.Tensor], profile_index: int
    ) -> list[torch.Tensor]:
        cuda, stream = self._cuda, state.stream
        self._select_profile(state, profile_index, stream.handle)
        input_shapes = {}
        for name in self.inputs:
            tensor = feeds[name].detach().cpu().contiguous()
            nbytes = _nbytes(tensor)
            host = state.buffers.host_buffer(name, nbytes)
            host[:] = tensor.reshape(-1).view(torch.uint8).numpy()
            device = state.buffers.device_buffer(name, nbytes)
            if nbytes:
                cuda.memcpy_htod_async(device, host, stream)
            input_shapes[name] = tuple(tensor.shape)
            self._set_input(state, name, input_shapes[name], int(device))
        shapes = self._output_shapes(state, input_shapes)
        sizes = {name: _volume(shape) * self.outputs[name].itemsize for name, shape in shapes.items()}
        for name, nbytes in sizes.items():
            self._set_address(state, name, int(state.buffers.device_buffer(name, nbytes)))
        allocator = None
        if self.data_dependent:
            # The pycuda buffers are reused (and grown) like the others; the copy below leaves them.
            def allocate(name: str, nbytes: int) -> tuple[int, Any]:
                buffer = state.buffers.device_buffer(name, nbytes)
                return int(buffer), buffer

            allocator = self._prepare_output_allocator(state, allocate)
        self._execute(state, stream.handle)
        if allocator is not None:
            for name, (shape, _) in self._allocated_outputs(allocator).items():
                shapes[name] = shape
                sizes[name] = _volume(shape) * self.outputs[name].itemsize
        hosts = {}
        for name, nbytes in sizes.items():
            hosts[name] = state.buffers.host_buffer(name, nbytes)
            if nbytes:
                cuda.memcpy_dtoh_async(hosts[name], state.buffers.device_buffer(name, nbytes), stream)
        stream.synchronize()
        state.completed()
        # Copy out of the reused pinned buffers: a returned tensor must not change on the next call.
        return [
            torch.from_numpy(hosts[name].copy()).view(self.outputs[name]).reshape(shapes[name])
            for name in self._output_order
        ]

    # ------------------------------------------------------- device (torch) path
    def _device_inputs(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self._gpu.device
        tensors = {}
        for name in self.inputs:
            tensor = feeds[name].detach()
            on_device = self._gpu.is_device_tensor(tensor)
            if on_device and tensor.device != device:
                raise InputError(
                    f"input {name!r} is on {tensor.device} but the engine runs on {device}; "
                    f"move it with .to('{device}')"
                )
            if not on_device or not tensor.is_contiguous() or tensor.data_ptr() % ALIGNMENT:
                # Copied (on the current stream) into a fresh, aligned device tensor.
                tensor = self._gpu.copy(self._gpu.empty(tuple(tensor.shape), tensor.dtype), tensor)
            tensors[name] = tensor
        return tensors

    def _bind_device(
        self, state: ExecutionState, tensors: Mapping[str, torch.Tensor], profile_index: int, stream: Any
    ) -> dict[str, torch.Tensor]:
        """Bind the inputs and fresh outputs, allocated on the *current* torch stream (their blocks' pool)."""
        if self._select_profile(state, profile_index, stream.cuda_stream):
            state.launched(stream, self._gpu.new_event)  # queued work: a later use elsewhere waits for it
        for name, tensor in tensors.items():
            self._set_input(state, name, tuple(tensor.shape), tensor.data_ptr())
        outputs = {}
        for name, shape in self._output_shapes(state, {n: tuple(t.shape) for n, t in tensors.items()}).items():
            outputs[name] = self._gpu.empty(shape, self.outputs[name])
            self._set_address(state, name, outputs[name].data_ptr())
        return outputs

    def _run_device(
        self, state: ExecutionState, feeds: Mapping[str, torch.Tensor], profile_index: int, use_graph: bool
    ) -> list[torch.Tensor]:
        tensors = self._device_inputs(feeds)
        caller = self._gpu.current_stream()
        if not self._gpu.is_default_stream(caller):
            return self._run_on(state, tensors, profile_index, caller, use_graph)
        # The legacy default stream: TensorRT would synchronise the device around the launch and
        # serialise the threads. Run on this state's side stream instead, ordered after the caller's
        # work and before whatever the caller enqueues next (Torch-TensorRT does the same).
        if state.side_stream is None:
            state.side_stream = self._gpu.new_stream()
        side = state.side_stream
        side.wait_stream(caller)
        with self._gpu.use_stream(side):
            outputs = self._run_on(state, tensors, profile_index, side, use_graph)
        caller.wait_stream(side)
        for output in outputs:  # allocated from the side stream's pool, used on the caller's
            self._gpu.record_stream(output, caller)
        return outputs

    def _run_on(
        self, state: ExecutionState, tensors: Mapping[str, torch.Tensor], profile_index: int, stream: Any, use_graph: bool
    ) -> list[torch.Tensor]:
        if use_graph:
            return self._run_graph(state, tensors, profile_index, stream)
        return self._launch_plain(state, tensors, profile_index, stream)

    def _launch_plain(
        self, state: ExecutionState, tensors: Mapping[str, torch.Tensor], profile_index: int, stream: Any
    ) -> list[torch.Tensor]:
        self._wait_for_last_launch(state, stream)
        outputs = self._bind_device(state, tensors, profile_index, stream)
        allocator = None
        if self.data_dependent:
            gpu = self._gpu

            def allocate(name: str, nbytes: int) -> tuple[int, torch.Tensor]:
                block = gpu.empty((nbytes,), torch.uint8)  # fresh each call: the caller keeps the output
                return block.data_ptr(), block

            allocator = self._prepare_output_allocator(state, allocate)
        self._execute(state, stream.cuda_stream)
        state.launched(stream, self._gpu.new_event)
        if allocator is not None:
            for name, (shape, block) in self._allocated_outputs(allocator).items():
                dtype = self.outputs[name]
                outputs[name] = block[: _volume(shape) * dtype.itemsize].view(dtype).reshape(shape)
        return [outputs[name] for name in self._output_order]

    def _run_graph(
        self, state: ExecutionState, tensors: Mapping[str, torch.Tensor], profile_index: int, stream: Any
    ) -> list[torch.Tensor]:
        key = (profile_index, tuple((name, tuple(t.shape)) for name, t in tensors.items()))
        if state.graph is None or state.graph.key != key:
            if state.graph is not None:
                logger.debug("CUDA graph: input shapes changed, capturing again")
            state.graph = None
            try:
                state.graph = self._capture(state, tensors, profile_index, key, stream)
            except _CaptureNotStarted as exc:
                logger.debug("CUDA graph: the capture did not start (%s); a plain launch this time", exc)
                return self._launch_plain(state, tensors, profile_index, stream)
            except GraphCaptureError as exc:
                self.graph_unsupported = True
                logger.warning(
                    "this engine cannot be captured into a CUDA graph (%s); running it with plain "
                    "launches from now on, as trtexec does",
                    exc,
                )
                return self._launch_plain(state, tensors, profile_index, stream)
        captured = state.graph
        if int(captured.stream.cuda_stream) != int(stream.cuda_stream):
            # Replayed on another stream than the static tensors' pool: keep their blocks until this work ends.
            for tensor in captured.static_tensors():
                self._gpu.record_stream(tensor, stream)
        self._wait_for_last_launch(state, stream)  # also protects the static inputs a replay reads
        for name, tensor in tensors.items():
            self._gpu.copy(captured.inputs[name], tensor)
        captured.graph.replay()  # on the current stream, after the copies
        state.launched(stream, self._gpu.new_event)
        # Copies, so that a returned tensor is not overwritten by the next replay.
        return [self._copy_of(captured.outputs[name]) for name in self._output_order]

    def _copy_of(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._gpu.copy(self._gpu.empty(tuple(tensor.shape), tensor.dtype), tensor)

    def _capture(
        self,
        state: ExecutionState,
        tensors: Mapping[str, torch.Tensor],
        profile_index: int,
        key: tuple[Any, ...],
        stream: Any,
    ) -> CapturedGraph:
        """Capture one launch on a new stream; the static tensors come from ``stream``'s pool (the caller's)."""
        gpu = self._gpu
        static_inputs = {name: self._copy_of(t) for name, t in tensors.items()}
        capture_stream = gpu.new_stream()
        capture_stream.wait_stream(stream)
        self._wait_for_last_launch(state, capture_stream)
        outputs = self._bind_device(state, static_inputs, profile_index, capture_stream)
        if self.data_dependent:  # found by _bind_device on this first call: TensorRT sizes them while running
            raise GraphCaptureError(f"outputs {self.data_dependent} have data-dependent shapes")
        with gpu.use_stream(capture_stream):
            # One plain launch first: TensorRT's deferred set-up after a shape change must not be captured.
            self._execute(state, capture_stream.cuda_stream)
            state.launched(capture_stream, gpu.new_event)
            graph = self._capture_launch(state, capture_stream)
        stream.wait_stream(capture_stream)
        return CapturedGraph(key, graph, static_inputs, outputs, stream)

    def _capture_launch(self, state: ExecutionState, capture_stream: Any) -> Any:
        """Capture one launch; a failure inside is reported, not masked by the capture's own error.

        Only a failure after the capture began marks the engine uncapturable; one
        before it (``torch.cuda.graph`` synchronising and emptying the cache) is
        ``_CaptureNotStarted``.
        """
        graph = self._gpu.new_graph()
        launch_error: EngineError | None = None
        began = False
        with CAPTURE_LOCK:
            try:
                with self._gpu.capture(graph, capture_stream):
                    began = True
                    try:
                        self._execute(state, capture_stream.cuda_stream)
                    except EngineError as exc:
                        launch_error = exc  # let the capture end normally, then report this one
            except RuntimeError as exc:  # ending an invalidated capture raises (torch's cudaErrorStreamCapture*)
                if not began:
                    raise _CaptureNotStarted(_one_line(exc)) from exc
                cause = launch_error or exc
                raise GraphCaptureError(_one_line(cause)) from cause
        if launch_error is not None:
            raise GraphCaptureError(_one_line(launch_error)) from launch_error
        return graph

    # ------------------------------------------------------------- insight
    def profile_layers(
        self, feeds: Mapping[str, torch.Tensor], profile_index: int = 0, runs: int = 10
    ) -> list[tuple[str, float]]:
        """Median time per layer (ms) over ``runs`` runs, slowest first.

        Uses a separate execution context with a ``trt.IProfiler`` attached, so
        the thread's own context keeps running unprofiled (profiling adds a
        synchronisation after every layer). Its buffers are freed before this
        returns, with the context pushed.
        """
        profiler = make_profiler(self._trt)
        with self.activated():
            state = self._new_state(profiler)
            try:
                for _ in range(max(1, runs)):
                    self._run(state, feeds, profile_index, use_graph=False)  # per-layer timing needs plain launches
                if self._gpu.available():
                    self._gpu.synchronize()
            finally:
                state.release()
        medians = [(name, statistics.median(ms)) for name, ms in profiler.times.items()]
        return sorted(medians, key=lambda item: item[1], reverse=True)

    def layer_information(self) -> dict[str, Any]:
        """The engine inspector's description of every layer (TensorRT's JSON, parsed)."""
        with self.activated():
            inspector = self._engine.create_engine_inspector()
            text = inspector.get_engine_information(self._trt.LayerInformationFormat.JSON)
        return json.loads(text)

    def layer_profile(
        self, graph: Any, feeds: Mapping[str, torch.Tensor], profile_index: int = 0, runs: int = 10
    ) -> LayerProfile:
        """Per-layer median times with the inspector's layer types (``executor.profiling.LayerProfiler``).

        The engine is what runs, so ``graph`` is not needed. Layer names are
        TensorRT's, after fusion.
        """
        return join_layer_types(self.profile_layers(feeds, profile_index, runs), self.layer_information(), runs)


class GraphCaptureError(EngineError):
    """The engine's launch could not be captured into a CUDA graph."""
