"""Test doubles of TensorRT, pycuda.driver and the slice of torch.cuda the runtime uses.

These are *doubles*, not TensorRT: they implement only the calls trtopt makes,
with the contracts TensorRT and pycuda document, and they are strict where a
mistake would be silent on a real GPU. They check *our* logic (which calls we
make, in what order, on which stream and thread, how we translate failures,
how we reuse and release buffers) and say nothing about TensorRT itself:
tests/test_gpu.py does that on a GPU, and tests/test_trt_api_surface.py checks
that every name we call exists in the real 10.x and 11.x bindings.

What each double enforces, and why:

- ``FakeEngine``/``FakeExecutionContext`` compute ``y = 2 * x + 1`` (float32)
  for every input ``x``, reading and writing device memory at the addresses we
  bind, so a wrong address, size or copy shows up as a wrong number.
  ``set_tensor_address`` returns False for an unknown name or an address that
  is not 256-byte aligned, as TensorRT does. Using one execution context on a
  second stream while its launch on the first stream has not completed and is
  not ordered before it by an event (undefined behaviour in TensorRT) raises
  ``ContextOverlapError`` and is recorded in ``FakeTensorRT.overlaps``.
- ``FakeOptimizationProfile.set_shape`` raises RuntimeError on an inconsistent
  range (rank mismatch, or not 0 <= min <= opt <= max), like the real bindings.
- ``set_optimization_profile_async`` raises RuntimeError("Error in set
  optimization profile async.") when TensorRT refuses and otherwise returns
  True, and ``infer_shapes`` raises RuntimeError("infer_shapes error code: -1")
  for inconsistent input shapes, as the bindings' lambdas in TensorRT's
  python/src/infer/pyCore.cpp do (``PY_ASSERT_RUNTIME_ERROR`` and
  ``throwPyError``); an engine whose plan says ``same_batch`` needs every
  input's dimension 0 equal, and its output shapes read -1 otherwise.
- ``FakeBuilderConfig`` starts with ``BuilderFlag.TF32`` set, as TensorRT's
  builder config does (NvInfer.h: kTF32 "enabled by default"; Polygraphy's
  ``CreateConfig`` clears it for that reason).
- Data-dependent outputs (plan ``data_dependent``: ``y = 2 * x[x > 0] + 1``,
  flattened): their shape reads -1 until a launch; ``execute_async_v3`` fails
  unless an ``IOutputAllocator`` is set for them, then, like enqueueV3, waits
  for the inputs, calls ``reallocate_output_async(name, memory, size,
  alignment, stream)`` and ``notify_shape(name, dims)`` before returning
  (NvInferRuntime.h's IOutputAllocator contract; the callback names are the
  ones pyCore.cpp's ``PyOutputAllocator`` looks up).
- ``FakeStream`` models a CUDA stream: enqueued work (copies, launches) runs
  only when the stream is synchronised, or when an event recorded after it is
  synchronised or waited for by another stream that is synchronised.
  ``FakeEvent.record``/``FakeStream.wait_event`` order two streams.
- pycuda context ownership per thread, as pycuda's C++ does it: a context
  object belongs to the thread that created it (``retain_primary_context``);
  allocating (``mem_alloc``, ``pagelocked_empty``, ``Stream()``) needs a
  current context; freeing an allocation or a stream needs its context current
  *or* to happen on the context's own thread (pycuda then activates it itself).
  Otherwise ``free()`` raises ``LogicError("cannot activate out-of-thread
  context")``, and a garbage-collected object is leaked with a warning, which
  the double records in ``FakeCuda.leaks``.
- ``FakeTorchCuda`` stands in for ``runtime.TorchCuda`` (torch.cuda): "device"
  tensors are CPU tensors backed by FakeCuda memory, streams and events are
  FakeStream/FakeEvent, and ``capture`` models CUDA-graph capture (a launch
  TensorRT cannot capture invalidates it; ending an invalidated capture raises,
  as torch does). It models torch's caching allocator where it matters for
  reuse: a block returns to the pool of the stream it was allocated on when
  its last tensor dies, and is then reused by that stream at once; so if
  another stream's work on it may still run (not finished, not waited for by
  the allocation stream, not announced with ``record_stream``) the double
  records a use-after-free hazard in ``FakeTorchCuda.hazards``. Entering a
  capture while another thread captures raises before the capture begins
  (``torch.cuda.graph.__enter__`` empties the cache, which fails then). A
  launch on the legacy default stream is recorded in
  ``FakeTensorRT.default_stream_launches`` (TensorRT synchronises the device
  around it).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import itertools
import json
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
import torch

ALIGNMENT = 256


class _Severity(enum.Enum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class FakeILogger:
    Severity = _Severity

    def __init__(self) -> None:
        pass


class FakeIProgressMonitor:
    def __init__(self) -> None:
        pass


class FakeIProfiler:
    def __init__(self) -> None:
        pass


class FakeIOutputAllocator:
    """``trt.IOutputAllocator``: subclasses define reallocate_output(_async) and notify_shape."""

    def __init__(self) -> None:
        pass


def _enum(name: str, *members: str) -> type[enum.Enum]:
    return enum.IntEnum(name, {m: i for i, m in enumerate(members)})


class ContextOverlapError(RuntimeError):
    """One execution context used on two streams at once: undefined behaviour in TensorRT."""


class FakeParserError:
    def __init__(self, node: int, name: str, op: str, desc: str) -> None:
        self._values = (node, name, op, desc)

    def node(self) -> int:
        return self._values[0]

    def node_name(self) -> str:
        return self._values[1]

    def node_operator(self) -> str:
        return self._values[2]

    def desc(self) -> str:
        return self._values[3]


class FakeTensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name = name
        self.shape = shape
        self.is_shape_tensor = False


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[FakeTensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> FakeTensor:
        return self.inputs[index]


class FakeOnnxParser:
    """Reads the ONNX file for real (so external data must be next to it); fails on ``unsupported_ops``."""

    def __init__(self, network: FakeNetwork, logger: Any) -> None:
        self.network = network
        self.errors: list[FakeParserError] = []

    def parse_from_file(self, path: str) -> bool:
        model = onnx.load(path)
        FakeTensorRT.last_parsed_path = path
        for index, node in enumerate(model.graph.node):
            if node.op_type in FakeTensorRT.unsupported_ops:
                self.errors.append(FakeParserError(index, node.name, node.op_type, "no importer registered"))
        initializers = {t.name for t in model.graph.initializer}
        for vi in model.graph.input:
            if vi.name not in initializers:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                self.network.inputs.append(FakeTensor(vi.name, dims))
                self.network.inputs[-1].is_shape_tensor = vi.name in FakeTensorRT.shape_tensor_inputs
        return not self.errors

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> FakeParserError:
        return self.errors[index]


class FakeOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        """Like the bindings: an inconsistent range raises RuntimeError (it is not deferred to add_...)."""
        lo, opt, hi = tuple(lo), tuple(opt), tuple(hi)
        if not len(lo) == len(opt) == len(hi) or not all(0 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise RuntimeError(f"fake: inconsistent dimensions for {name}: min {lo}, opt {opt}, max {hi}")
        self.shapes[name] = (lo, opt, hi)


class FakeTimingCache:
    """Serialises as ``FAKE-TC <gpu> <entry,entry,...>``; each build adds one entry."""

    def __init__(self, entries: set[str], device: str) -> None:
        self.entries = set(entries)
        self.device = device

    def serialize(self) -> bytes:
        return f"FAKE-TC {self.device} {','.join(sorted(self.entries)) or '-'}".encode()

    def combine(self, other: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if other.device != self.device and not ignore_mismatch:
            return False
        self.entries |= other.entries
        return True


class FakeBuilderConfig:
    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.pool_limits: dict[Any, int] = {}
        self.flags: set[Any] = {FakeTensorRT.BuilderFlag.TF32}  # TensorRT's default (see the module docstring)
        self.profiles: list[FakeOptimizationProfile] = []
        self.timing_cache: FakeTimingCache | None = None
        self.builder_optimization_level = 3
        self.profiling_verbosity = None
        self.hardware_compatibility_level = None
        self.progress_monitor = None

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pool_limits[pool] = size

    def set_flag(self, flag: Any) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: Any) -> None:
        self.flags.discard(flag)

    def add_optimization_profile(self, profile: FakeOptimizationProfile) -> int:
        for name, (lo, opt, hi) in profile.shapes.items():
            if not all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi)) or FakeTensorRT.reject_profiles:
                self.logger.log(_Severity.ERROR, f"invalid profile for {name}: {lo} {opt} {hi}")
                return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        if data == b"":
            return FakeTimingCache(set(), FakeTensorRT.gpu)
        parts = bytes(data).split()
        if len(parts) != 3 or parts[0] != b"FAKE-TC":
            raise RuntimeError("corrupt timing cache")
        entries = {e for e in parts[2].decode().split(",") if e and e != "-"}
        return FakeTimingCache(entries, parts[1].decode())

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if cache.device != FakeTensorRT.gpu and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.timing_cache


class FakeBuilder:
    def __init__(self, logger: Any) -> None:
        if FakeTensorRT.builder_error is not None:  # e.g. a driver too old for this TensorRT's CUDA
            logger.log(_Severity.ERROR, FakeTensorRT.builder_error)
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.logger = logger
        FakeTensorRT.builders.append(self)

    def create_network(self, flags: int) -> FakeNetwork:
        self.network = FakeNetwork(flags)
        return self.network

    def create_builder_config(self) -> FakeBuilderConfig:
        self.config = FakeBuilderConfig(self.logger)
        return self.config

    def create_optimization_profile(self) -> FakeOptimizationProfile:
        return FakeOptimizationProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeBuilderConfig) -> bytes | None:
        if config.progress_monitor is not None:
            config.progress_monitor.phase_start("Building", None, 2)
            config.progress_monitor.step_complete("Building", 0)
            config.progress_monitor.phase_finish("Building")
        if FakeTensorRT.fail_build:
            self.logger.log(_Severity.ERROR, "fake: out of tactics for node X")
            return None
        FakeTensorRT.builds += 1
        if config.timing_cache is not None:
            config.timing_cache.entries.add(f"b{FakeTensorRT.builds}")
        ranges = [{n: s for n, s in p.shapes.items()} for p in config.profiles]
        plan = {
            "inputs": [t.name for t in network.inputs],
            "profiles": ranges or [{}],
            "version_compatible": FakeTensorRT.BuilderFlag.VERSION_COMPATIBLE in config.flags,
            "tf32": FakeTensorRT.BuilderFlag.TF32 in config.flags,
            "built_by": FakeTensorRT.version,
            **FakeTensorRT.plan_extras,
        }
        return b"FAKE-ENGINE" + json.dumps(plan).encode()


# ----------------------------------------------------------------- runtime side
class FakeExecutionContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.profile_switches: list[int] = []
        self.executions = 0
        self.profiler = None
        self.allocators: dict[str, Any] = {}
        self.nvtx_verbosity = FakeTensorRT.ProfilingVerbosity.DETAILED  # the engine's, as built
        self._last_use: tuple[FakeStream, int] | None = None

    def _use(self, handle: int, what: str) -> FakeStream:
        """The stream behind ``handle``, after checking no launch of ours on another stream may overlap."""
        stream = FakeStream.by_handle(handle)
        if self._last_use is not None:
            other, position = self._last_use
            if other is not stream and not stream.ordered_after(other, position):
                message = (
                    f"fake: {what} on stream {stream.handle} while this context's work on stream "
                    f"{other.handle} may still run (no event orders them)"
                )
                FakeTensorRT.overlaps.append(message)
                raise ContextOverlapError(message)
        return stream

    def _mark(self, stream: FakeStream) -> None:
        self._last_use = (stream, stream.enqueued)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        """pyCore.cpp: PY_ASSERT_RUNTIME_ERROR(setOptimizationProfileAsync(...), ...); return true."""
        target = self._use(stream, "set_optimization_profile_async")
        if not 0 <= index < self.engine.num_optimization_profiles or FakeTensorRT.fail_profile:
            self.engine.logger.log(_Severity.ERROR, f"fake: profile {index} cannot be selected on this context")
            raise RuntimeError("Error in set optimization profile async.")
        self.profile = index
        self.profile_switches.append(index)
        target.enqueue(lambda: None)
        self._mark(target)
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        ranges = self.engine.plan["profiles"][self.profile].get(name)
        if ranges is not None and not all(lo <= s <= hi for s, lo, hi in zip(shape, ranges[0], ranges[2])):
            self.engine.logger.log(_Severity.ERROR, f"shape {shape} outside profile {self.profile}")
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.names or int(address) % ALIGNMENT:
            self.engine.logger.log(_Severity.ERROR, f"fake: invalid address {int(address):#x} for tensor {name}")
            return False
        self.addresses[name] = int(address)
        return True

    def _consistent(self) -> bool:
        if not self.engine.plan.get("same_batch"):
            return True
        return len({shape[0] for shape in self.shapes.values() if shape}) <= 1

    def infer_shapes(self) -> list[str]:
        """Names of inputs without a shape; raises for inconsistent shapes (pyCore.cpp's infer_shapes)."""
        FakeTensorRT.infer_shapes_calls += 1
        if not self._consistent():
            self.engine.logger.log(_Severity.ERROR, f"fake: inconsistent input dimensions {self.shapes}")
            raise RuntimeError("infer_shapes error code: -1")
        return [name for name in self.engine.plan["inputs"] if name not in self.shapes]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.plan.get("data_dependent", ()):
            return (-1,)
        shape = self.shapes.get(self.engine.output_of[name], ())
        if not self._consistent():
            return tuple(-1 for _ in shape)
        return shape

    def set_output_allocator(self, name: str, allocator: Any) -> bool:
        if name not in self.engine.output_of:
            return False
        self.allocators[name] = allocator
        return True

    def execute_async_v3(self, stream: int) -> bool:
        if FakeTensorRT.fail_execute:
            self.engine.logger.log(_Severity.ERROR, "fake: illegal memory access")
            return False
        target = FakeStream.by_handle(stream)
        if target.capturing is not None:
            if self.engine.plan.get("uncapturable"):
                self.engine.logger.log(_Severity.ERROR, "fake: the engine has a loop, which cannot be captured")
                target.capturing.invalid = True
                return False
            target.capturing.ops.append(self._launch())
            return True
        target = self._use(stream, "execute_async_v3")
        if FakeTorchCuda.active is not None and target is FakeTorchCuda.active._default:
            FakeTensorRT.default_stream_launches += 1
        data_dependent = self.engine.plan.get("data_dependent", ())
        if data_dependent:
            missing = [n for n in data_dependent if n not in self.allocators]
            if missing:
                self.engine.logger.log(_Severity.ERROR, f"fake: neither address nor allocator is set for {missing}")
                return False
            target.synchronize()  # enqueueV3 waits for the inputs to learn the output sizes
            if not self._allocate_data_dependent(stream):
                return False
        launch = self._launch()
        target.enqueue(launch)
        _note_uses(launch.addresses, target)
        self._mark(target)
        self.executions += 1
        if self.profiler is not None:
            self.profiler.report_layer_time("fake_conv", 0.25)
            self.profiler.report_layer_time("fake_relu", 0.05)
        return True

    def _allocate_data_dependent(self, stream: int) -> bool:
        """Ask each data-dependent output's allocator for memory and report its shape, as enqueueV3 does."""
        for out in self.engine.plan["data_dependent"]:
            inp = self.engine.output_of[out]
            x = np.frombuffer(FakeCuda.memory[self.addresses[inp]], np.float32, int(np.prod(self.shapes[inp])))
            count = int((x > 0).sum())
            allocator = self.allocators[out]
            address = allocator.reallocate_output_async(out, self.addresses.get(out, 0), max(count * 4, 1), ALIGNMENT, stream)
            if not address or int(address) not in FakeCuda.memory:
                self.engine.logger.log(_Severity.ERROR, f"fake: the output allocator gave no memory for {out}")
                return False
            self.addresses[out] = int(address)
            allocator.notify_shape(out, (count,))
        return True

    def _launch(self) -> Callable[[], None]:
        """The work of one launch: bindings are read now (at enqueue), memory when the stream runs."""
        jobs = []
        data_dependent = set(self.engine.plan.get("data_dependent", ()))
        for out, inp in self.engine.output_of.items():
            count = int(np.prod(self.shapes[inp]))
            jobs.append((self.addresses[inp], self.addresses[out], count, out in data_dependent))

        def run() -> None:
            for source, dest, count, positives_only in jobs:
                x = np.frombuffer(FakeCuda.memory[source], np.float32, count)
                y = 2 * (x[x > 0] if positives_only else x) + 1
                FakeCuda.memory[dest][: y.nbytes] = y.astype(np.float32).tobytes()

        run.addresses = [a for job in jobs for a in job[:2]]  # type: ignore[attr-defined]
        return run


class FakeInspector:
    def get_engine_information(self, fmt: Any) -> str:
        return json.dumps({"Layers": ["fake_conv", "fake_relu"], "format": fmt.name})


class FakeEngine:
    def __init__(self, plan: dict[str, Any], logger: Any) -> None:
        self.plan = plan
        self.logger = logger
        self.output_of = {f"{name}_out": name for name in plan["inputs"]}
        self.names = list(plan["inputs"]) + list(self.output_of)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.plan["profiles"])

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> Any:
        return FakeTensorRT.TensorIOMode.OUTPUT if name in self.output_of else FakeTensorRT.TensorIOMode.INPUT

    def get_tensor_dtype(self, name: str) -> Any:
        return FakeTensorRT.DataType.FLOAT

    def create_execution_context(self) -> FakeExecutionContext:
        return FakeExecutionContext(self)

    def create_engine_inspector(self) -> FakeInspector:
        return FakeInspector()


class FakeRuntime:
    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        if not data.startswith(b"FAKE-ENGINE"):
            self.logger.log(_Severity.ERROR, "fake: serialization version mismatch")
            return None
        plan = json.loads(data[len(b"FAKE-ENGINE"):])
        if plan.get("version_compatible"):
            if not self.engine_host_code_allowed:  # TensorRT refuses to run a lean runtime's host code unasked
                self.logger.log(_Severity.ERROR, "fake: engine host code is not allowed")
                return None
        elif plan.get("built_by", FakeTensorRT.version) != FakeTensorRT.version:
            self.logger.log(_Severity.ERROR, "fake: serialization version mismatch")
            return None
        return FakeEngine(plan, self.logger)


class FakeTensorRT(types.ModuleType):
    """A module object standing in for ``tensorrt``; class attributes hold knobs and counters."""

    unsupported_ops: set[str] = set()
    fail_build = False
    fail_execute = False
    reject_profiles = False
    builder_error: str | None = None
    fail_profile = False
    shape_tensor_inputs: set[str] = set()
    plan_extras: dict[str, Any] = {}
    builds = 0
    infer_shapes_calls = 0
    default_stream_launches = 0
    builders: list[FakeBuilder] = []
    overlaps: list[str] = []
    gpu = "fake-gpu"
    version = "10.99.0-fake"
    last_parsed_path = ""

    ILogger = FakeILogger
    IProgressMonitor = FakeIProgressMonitor
    IProfiler = FakeIProfiler
    IOutputAllocator = FakeIOutputAllocator
    Builder = FakeBuilder
    OnnxParser = FakeOnnxParser
    Runtime = FakeRuntime
    NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", "STRONGLY_TYPED")
    MemoryPoolType = _enum("MemoryPoolType", "WORKSPACE")
    ProfilingVerbosity = _enum("ProfilingVerbosity", "LAYER_NAMES_ONLY", "NONE", "DETAILED")
    BuilderFlag = _enum("BuilderFlag", "VERSION_COMPATIBLE", "TF32")
    HardwareCompatibilityLevel = _enum("HardwareCompatibilityLevel", "NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY")
    TensorIOMode = _enum("TensorIOMode", "NONE", "INPUT", "OUTPUT")
    DataType = _enum("DataType", "FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8", "FP8")
    LayerInformationFormat = _enum("LayerInformationFormat", "ONELINE", "JSON")

    def __init__(self) -> None:
        super().__init__("tensorrt")
        cls = type(self)
        cls.version = "10.99.0-fake"
        self.__version__ = cls.version
        cls.unsupported_ops = set()
        cls.fail_build = False
        cls.fail_execute = False
        cls.reject_profiles = False
        cls.builder_error = None
        cls.fail_profile = False
        cls.shape_tensor_inputs = set()
        cls.plan_extras = {}
        cls.builds = 0
        cls.infer_shapes_calls = 0
        cls.default_stream_launches = 0
        cls.builders = []
        cls.overlaps = []


# ------------------------------------------------------------------ streams and events
class FakeStream:
    """A CUDA stream: work runs in order, and only when something waits for it (see the module docstring).

    Speaks both pycuda's protocol (``handle``, ``wait_for_event``) and torch's
    (``cuda_stream``, ``wait_event``, ``wait_stream``, ``query``).
    """

    _handles = itertools.count(1000)
    _registry: weakref.WeakValueDictionary[int, FakeStream] = weakref.WeakValueDictionary()
    _lock = threading.RLock()

    def __init__(self) -> None:
        self.handle = next(self._handles)
        self.ops: list[Callable[[], None]] = []
        self.enqueued = 0  # ops ever enqueued: positions are 1..enqueued
        self.done = 0
        self.synchronized = 0
        self.waits: dict[int, int] = {}  # other stream's handle -> position this stream waits for
        self.wait_list: list[tuple[int, FakeStream, int]] = []  # (this stream's position, other, its position)
        self.capturing: FakeGraph | None = None
        FakeStream._registry[self.handle] = self

    @property
    def cuda_stream(self) -> int:
        return self.handle

    @classmethod
    def by_handle(cls, handle: int) -> FakeStream:
        try:
            return cls._registry[int(handle)]
        except KeyError:
            raise AssertionError(f"fake: no stream has handle {handle}") from None

    def enqueue(self, op: Callable[[], None]) -> None:
        with self._lock:
            self.ops.append(op)
            self.enqueued += 1

    def run_until(self, position: int) -> None:
        with self._lock:
            while self.done < position:
                op = self.ops[self.done]
                self.done += 1
                op()

    def synchronize(self) -> None:
        self.synchronized += 1
        self.run_until(self.enqueued)

    def is_done(self) -> bool:
        return self.done == self.enqueued

    query = is_done

    def ordered_after(self, other: FakeStream, position: int, upto: int | None = None, seen: set[int] | None = None) -> bool:
        """True when work enqueued here from now on (or after this stream's first ``upto`` ops) cannot
        start before ``other``'s first ``position`` ops end; waits are followed through other streams,
        as CUDA orders them (this stream waits for C, which had waited for ``other``)."""
        if other.done >= position:
            return True
        seen = set() if seen is None else seen
        for at, source, source_position in self.wait_list:
            if upto is not None and at > upto:
                continue
            if source is other and source_position >= position:
                return True
            if source.handle not in seen:
                seen.add(source.handle)
                if source.ordered_after(other, position, source_position, seen):
                    return True
        return False

    def wait_event(self, event: FakeEvent) -> None:
        if event.stream is None:
            return
        source, position = event.stream, event.position
        self.waits[source.handle] = max(self.waits.get(source.handle, 0), position)
        self.enqueue(lambda: source.run_until(position))
        self.wait_list.append((self.enqueued, source, position))

    wait_for_event = wait_event

    def wait_stream(self, other: FakeStream) -> None:
        event = FakeEvent()
        event.record(other)
        self.wait_event(event)


class FakeEvent:
    """A CUDA event (torch's protocol): marks a position in a stream's work."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.stream: FakeStream | None = None
        self.position = 0

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream if stream is not None else FakeTorchCuda.active.current_stream()
        self.stream, self.position = stream, stream.enqueued

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.run_until(self.position)

    def query(self) -> bool:
        return self.stream is None or self.stream.done >= self.position


# ------------------------------------------------------------------ pycuda.driver
class FakeLogicError(RuntimeError):
    """pycuda.driver.LogicError."""


_context_stacks = threading.local()


def _stack() -> list[FakePrimaryContext]:
    if not hasattr(_context_stacks, "stack"):
        _context_stacks.stack = []
    return _context_stacks.stack


def _current_context() -> FakePrimaryContext | None:
    stack = _stack()
    return stack[-1] if stack else None


class FakePrimaryContext:
    """A retained primary context; like pycuda's ``context`` object it belongs to the thread that made it."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def push(self) -> None:
        _stack().append(self)
        with FakeStream._lock:
            FakeCuda.depth += 1


class FakeContextStack:
    @staticmethod
    def pop() -> None:
        stack = _stack()
        if not stack:
            raise FakeLogicError("context::pop failed: cannot pop non-current context")
        stack.pop()
        with FakeStream._lock:
            FakeCuda.depth -= 1


def _owning_context() -> FakePrimaryContext:
    context = _current_context()
    if context is None:
        raise FakeLogicError("explicit_context_dependent failed: invalid device context - no currently active context?")
    return context


def _release(owner: FakePrimaryContext, what: str) -> None:
    """pycuda's scoped_context_activation: fine with the owner current or on the owner's thread."""
    if _current_context() is not owner and threading.get_ident() != owner.thread:
        raise FakeLogicError(f"cannot activate out-of-thread context (freeing {what})")


class _ContextDependent:
    """Freed explicitly with ``free()``, or on garbage collection, where an error becomes a recorded leak."""

    what = "object"

    def __init__(self) -> None:
        self.owner = _owning_context()
        self.freed = False

    def free(self) -> None:
        if self.freed:
            return
        _release(self.owner, self.what)
        self.freed = True
        self._on_free()
        FakeCuda.freed.append(self.what)

    def _on_free(self) -> None:
        pass

    def __del__(self) -> None:
        try:
            self.free()
        except FakeLogicError as exc:  # pycuda prints a warning and leaks the memory
            FakeCuda.leaks.append(f"{self.what}: {exc}")
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class FakeDeviceAllocation(_ContextDependent):
    what = "device memory"

    def __init__(self, nbytes: int, misalign: int = 0) -> None:
        super().__init__()
        self.address, self.buffer = _device_block(nbytes, misalign)

    def __int__(self) -> int:
        return self.address

    def _on_free(self) -> None:
        FakeCuda.memory.pop(self.address, None)


class FakeHostAllocation(np.ndarray):
    """What ``pagelocked_empty(...).base`` is in pycuda: it owns the pinned memory and has ``free()``."""

    _record: _HostRecord

    def free(self) -> None:
        self._record.free()


class _HostRecord(_ContextDependent):
    what = "pinned host memory"


class FakePycudaStream(FakeStream, _ContextDependent):
    what = "stream"

    def __init__(self) -> None:
        _ContextDependent.__init__(self)
        FakeStream.__init__(self)


def _device_block(nbytes: int, misalign: int = 0) -> tuple[int, memoryview]:
    """A 256-byte aligned (plus ``misalign``) block registered in FakeCuda.memory under its real address."""
    size = max(int(nbytes), 16)
    raw = bytearray(size + 2 * ALIGNMENT)
    base = ctypes.addressof((ctypes.c_char * len(raw)).from_buffer(raw))
    pad = (-base) % ALIGNMENT + misalign
    view = memoryview(raw)[pad : pad + size]
    FakeCuda.memory[base + pad] = view
    FakeCuda._keep.append(raw)
    return base + pad, view


class FakeDevice:
    def __init__(self, index: int) -> None:
        self.index = index

    def name(self) -> str:
        return FakeCuda.device_name

    def compute_capability(self) -> tuple[int, int]:
        return FakeCuda.compute_capability

    def retain_primary_context(self) -> FakePrimaryContext:
        return FakePrimaryContext()

    @staticmethod
    def count() -> int:
        return 1


class FakeCuda(types.ModuleType):
    """Stands in for ``pycuda.driver``: device memory is a dict of buffers keyed by address."""

    memory: dict[int, Any] = {}
    _keep: list[bytearray] = []
    depth = 0
    compute_capability = (8, 9)
    device_name = "Fake GPU 80GB"
    leaks: list[str] = []
    freed: list[str] = []
    misalign = 0

    Device = FakeDevice
    Context = FakeContextStack
    Stream = FakePycudaStream
    LogicError = FakeLogicError

    def __init__(self) -> None:
        super().__init__("pycuda.driver")
        cls = type(self)
        cls.memory = {}
        cls._keep = []
        cls.depth = 0
        cls.compute_capability = (8, 9)
        cls.device_name = "Fake GPU 80GB"
        cls.leaks = []
        cls.freed = []
        cls.misalign = 0
        FakeStream._registry.clear()  # streams of earlier tests may still hold work on freed memory
        _stack().clear()
        self.device_allocations = 0
        self.host_allocations = 0

    def init(self) -> None:
        pass

    def mem_alloc(self, nbytes: int) -> FakeDeviceAllocation:
        allocation = FakeDeviceAllocation(nbytes, FakeCuda.misalign)
        self.device_allocations += 1
        return allocation

    def pagelocked_empty(self, shape: Any, dtype: Any) -> np.ndarray:
        owner = FakeHostAllocation(shape, dtype)
        owner._record = _HostRecord()  # dies with the memory: a collected buffer is checked like pycuda's
        self.host_allocations += 1
        return owner.view(np.ndarray)

    def memcpy_htod_async(self, dest: FakeDeviceAllocation, src: np.ndarray, stream: FakeStream) -> None:
        def copy() -> None:  # reads the pinned buffer when the copy runs, not now
            data = np.ascontiguousarray(src).tobytes()
            FakeCuda.memory[int(dest)][: len(data)] = data

        stream.enqueue(copy)

    def memcpy_dtoh_async(self, dest: np.ndarray, src: FakeDeviceAllocation, stream: FakeStream) -> None:
        def copy() -> None:
            dest[:] = np.frombuffer(FakeCuda.memory[int(src)], np.uint8, dest.nbytes)

        stream.enqueue(copy)


# ------------------------------------------------------------------ torch.cuda
class FakeGraph:
    def __init__(self) -> None:
        self.ops: list[Callable[[], None]] = []
        self.invalid = False
        self.replays = 0

    def replay(self) -> None:
        stream = FakeTorchCuda.active.current_stream()
        for op in self.ops:
            stream.enqueue(op)
            _note_uses(getattr(op, "addresses", ()), stream)
        self.replays += 1


@dataclasses.dataclass
class _Block:
    """A torch caching-allocator block: the stream it came from, and the work of other streams on it."""

    stream: FakeStream
    uses: list[tuple[FakeStream, int]] = dataclasses.field(default_factory=list)
    recorded: set[int] = dataclasses.field(default_factory=set)  # handles given to record_stream


def _note_uses(addresses: Any, stream: FakeStream) -> None:
    """Work just enqueued on ``stream`` reads or writes these device addresses."""
    active = FakeTorchCuda.active
    if active is None:
        return
    for address in addresses:
        block = active.blocks.get(int(address))
        if block is not None and block.stream is not stream:
            block.uses.append((stream, stream.enqueued))


class FakeTorchCuda:
    """Stands in for ``runtime.TorchCuda``; "device" tensors are CPU tensors in FakeCuda memory.

    ``active`` is the instance in use, for FakeEvent.record()/FakeGraph.replay()
    without a stream (torch's current-stream default). ``blocks`` and
    ``hazards`` model torch's caching allocator (see the module docstring).
    """

    active: FakeTorchCuda | None = None
    _capturing = 0  # captures in progress, any thread
    _capture_guard = threading.Lock()

    def __init__(self, device_index: int = 0) -> None:
        self.device = torch.device("cpu")
        self._default = FakeStream()
        self._current = threading.local()
        self.captures = 0
        self.blocks: dict[int, _Block] = {}
        self.hazards: list[str] = []
        FakeTorchCuda.active = self

    def available(self) -> bool:
        return True

    def is_device_tensor(self, tensor: torch.Tensor) -> bool:
        return tensor.data_ptr() in FakeCuda.memory

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = int(np.prod(shape, dtype=np.int64))
        nbytes = numel * dtype.itemsize
        address, view = _device_block(nbytes)
        # The block is freed when the last tensor on it dies: torch keeps the buffer's exporter alive.
        owner = np.frombuffer(view, np.uint8)
        self.blocks[address] = _Block(self.current_stream())
        weakref.finalize(owner, self._free, address)
        return torch.frombuffer(owner, dtype=dtype, count=max(numel, 1))[:numel].view(shape)

    def _free(self, address: int) -> None:
        """The block goes back to its stream's pool, reusable there at once: other streams must be done."""
        block = self.blocks.pop(address, None)
        if block is None:
            return
        for stream, position in block.uses:
            done = stream.done >= position or block.stream.ordered_after(stream, position)
            if not done and stream.handle not in block.recorded:
                self.hazards.append(
                    f"block {address:#x} of stream {block.stream.handle} freed while stream {stream.handle} "
                    "may still use it (no wait, no record_stream)"
                )

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        block = self.blocks.get(tensor.data_ptr())
        if block is not None:
            block.recorded.add(stream.handle)

    def tensor(self, value: torch.Tensor) -> torch.Tensor:
        """A "device" copy of ``value`` (for tests: what ``x.cuda()`` would give)."""
        out = self.empty(tuple(value.shape), value.dtype)
        out.copy_(value)
        return out

    def copy(self, dest: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Stream-ordered like torch's: a device source is read when the stream runs, a host one now."""
        if not self.is_device_tensor(source):
            source = source.clone()
        stream = self.current_stream()
        if self.is_device_tensor(source) and source.is_contiguous() and source.dtype == dest.dtype:
            # By address, as a CUDA copy is: queued work keeps no tensor (and no block) alive.
            dest_ptr, source_ptr, nbytes = dest.data_ptr(), source.data_ptr(), source.numel() * source.element_size()
            stream.enqueue(lambda: ctypes.memmove(dest_ptr, source_ptr, nbytes))
        else:
            stream.enqueue(lambda: dest.copy_(source))
        _note_uses((dest.data_ptr(), source.data_ptr()), stream)
        return dest

    def current_stream(self) -> FakeStream:
        return getattr(self._current, "stream", None) or self._default

    def is_default_stream(self, stream: FakeStream) -> bool:
        return stream is self._default

    def new_stream(self) -> FakeStream:
        return FakeStream()

    def new_event(self) -> FakeEvent:
        return FakeEvent()

    @contextlib.contextmanager
    def use_stream(self, stream: FakeStream) -> Iterator[None]:
        previous = getattr(self._current, "stream", None)
        self._current.stream = stream
        try:
            yield
        finally:
            self._current.stream = previous

    def new_graph(self) -> FakeGraph:
        return FakeGraph()

    @contextlib.contextmanager
    def capture(self, graph: FakeGraph, stream: FakeStream) -> Iterator[None]:
        """Like torch.cuda.graph: entering while another capture runs fails before it begins (the
        cache cannot be emptied then); ending an invalidated capture raises, whatever happened inside."""
        with FakeTorchCuda._capture_guard:
            if FakeTorchCuda._capturing:
                raise RuntimeError("fake: empty_cache() while another thread is capturing a CUDA graph")
            FakeTorchCuda._capturing += 1
        self.captures += 1
        stream.capturing = graph
        try:
            with self.use_stream(stream):
                yield
        finally:
            stream.capturing = None
            with FakeTorchCuda._capture_guard:
                FakeTorchCuda._capturing -= 1
            if graph.invalid:
                raise RuntimeError("fake CUDA error: operation failed due to a previous error during capture")

    def synchronize(self) -> None:
        for stream in list(FakeStream._registry.values()):
            stream.synchronize()

