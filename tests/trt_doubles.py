"""Test doubles of TensorRT and pycuda.driver, for testing the logic around their calls on a CPU.

They implement only the calls trtopt makes, with the contracts DESIGN.md §3
states (None/False/-1 on failure, errors reported through the logger). They
check *our* logic: which calls we make, in what order, with what values, how
we translate failures, how we reuse buffers. They say nothing about TensorRT
itself: tests/test_gpu.py does that, and tests/test_trt_api_surface.py checks
that every name we call exists in the real 10.x and 11.x bindings.

The fake engine computes ``y = 2 * x + 1`` (float32) for every input ``x``,
reading and writing FakeCuda's "device memory" at the addresses we bind, so a
wrong address, size or copy shows up as a wrong number.
"""

from __future__ import annotations

import enum
import itertools
import json
import types
from typing import Any

import numpy as np
import onnx


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


def _enum(name: str, *members: str) -> type[enum.Enum]:
    return enum.IntEnum(name, {m: i for i, m in enumerate(members)})


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
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeTimingCache:
    def __init__(self, builds: int, device: str) -> None:
        self.builds = builds
        self.device = device

    def serialize(self) -> bytes:
        return f"FAKE-TC {self.device} {self.builds}".encode()


class FakeBuilderConfig:
    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.pool_limits: dict[Any, int] = {}
        self.flags: set[Any] = set()
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

    def add_optimization_profile(self, profile: FakeOptimizationProfile) -> int:
        for name, (lo, opt, hi) in profile.shapes.items():
            if not all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
                self.logger.log(_Severity.ERROR, f"invalid profile for {name}: {lo} {opt} {hi}")
                return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        if data == b"":
            return FakeTimingCache(0, FakeTensorRT.gpu)
        parts = bytes(data).split()
        if len(parts) != 3 or parts[0] != b"FAKE-TC":
            raise RuntimeError("corrupt timing cache")
        return FakeTimingCache(int(parts[2]), parts[1].decode())

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if cache.device != FakeTensorRT.gpu and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.timing_cache


class FakeBuilder:
    def __init__(self, logger: Any) -> None:
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
        if config.timing_cache is not None:
            config.timing_cache.builds += 1
        FakeTensorRT.builds += 1
        ranges = [{n: s for n, s in p.shapes.items()} for p in config.profiles]
        plan = {"inputs": [t.name for t in network.inputs], "profiles": ranges or [{}]}
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

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile = index
        self.profile_switches.append(index)
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        ranges = self.engine.plan["profiles"][self.profile].get(name)
        if ranges is not None and not all(lo <= s <= hi for s, lo, hi in zip(shape, ranges[0], ranges[2])):
            self.engine.logger.log(_Severity.ERROR, f"shape {shape} outside profile {self.profile}")
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[self.engine.output_of[name]]

    def execute_async_v3(self, stream: int) -> bool:
        if FakeTensorRT.fail_execute:
            self.engine.logger.log(_Severity.ERROR, "fake: illegal memory access")
            return False
        memory = FakeCuda.memory
        for out, inp in self.engine.output_of.items():
            count = int(np.prod(self.shapes[inp]))
            x = np.frombuffer(memory[self.addresses[inp]], np.float32, count)
            y = 2 * x + 1
            memory[self.addresses[out]][: y.nbytes] = y.tobytes()
        self.executions += 1
        if self.profiler is not None:
            self.profiler.report_layer_time("fake_conv", 0.25)
            self.profiler.report_layer_time("fake_relu", 0.05)
        return True


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
        return FakeEngine(json.loads(data[len(b"FAKE-ENGINE"):]), self.logger)


class FakeTensorRT(types.ModuleType):
    """A module object standing in for ``tensorrt``; class attributes hold knobs and counters."""

    unsupported_ops: set[str] = set()
    fail_build = False
    fail_execute = False
    builds = 0
    builders: list[FakeBuilder] = []
    gpu = "fake-gpu"
    last_parsed_path = ""

    ILogger = FakeILogger
    IProgressMonitor = FakeIProgressMonitor
    IProfiler = FakeIProfiler
    Builder = FakeBuilder
    OnnxParser = FakeOnnxParser
    Runtime = FakeRuntime
    NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", "STRONGLY_TYPED")
    MemoryPoolType = _enum("MemoryPoolType", "WORKSPACE")
    ProfilingVerbosity = _enum("ProfilingVerbosity", "LAYER_NAMES_ONLY", "DETAILED")
    BuilderFlag = _enum("BuilderFlag", "VERSION_COMPATIBLE")
    HardwareCompatibilityLevel = _enum("HardwareCompatibilityLevel", "NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY")
    TensorIOMode = _enum("TensorIOMode", "NONE", "INPUT", "OUTPUT")
    DataType = _enum("DataType", "FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8", "FP8")
    LayerInformationFormat = _enum("LayerInformationFormat", "ONELINE", "JSON")

    def __init__(self) -> None:
        super().__init__("tensorrt")
        self.__version__ = "10.99.0-fake"
        type(self).unsupported_ops = set()
        type(self).fail_build = False
        type(self).fail_execute = False
        type(self).builds = 0
        type(self).builders = []


# ------------------------------------------------------------------ pycuda.driver
class FakeDeviceAllocation:
    def __init__(self, address: int) -> None:
        self.address = address

    def __int__(self) -> int:
        return self.address


class FakeStream:
    handles = itertools.count(1000)

    def __init__(self) -> None:
        self.handle = next(self.handles)
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1


class FakePrimaryContext:
    def push(self) -> None:
        FakeCuda.depth += 1


class FakeContextStack:
    @staticmethod
    def pop() -> None:
        FakeCuda.depth -= 1


class FakeDevice:
    def __init__(self, index: int) -> None:
        self.index = index

    def name(self) -> str:
        return "Fake GPU 80GB"

    def compute_capability(self) -> tuple[int, int]:
        return FakeCuda.compute_capability

    def retain_primary_context(self) -> FakePrimaryContext:
        return FakePrimaryContext()


class FakeCuda(types.ModuleType):
    """Stands in for ``pycuda.driver``: device memory is a dict of bytearrays keyed by address."""

    memory: dict[int, bytearray] = {}
    depth = 0
    compute_capability = (8, 9)

    Device = FakeDevice
    Context = FakeContextStack
    Stream = FakeStream

    def __init__(self) -> None:
        super().__init__("pycuda.driver")
        type(self).memory = {}
        type(self).depth = 0
        type(self).compute_capability = (8, 9)
        self.device_allocations = 0
        self.host_allocations = 0
        self._next = itertools.count(1 << 20, 1 << 16)

    def mem_alloc(self, nbytes: int) -> FakeDeviceAllocation:
        self.device_allocations += 1
        address = next(self._next)
        FakeCuda.memory[address] = bytearray(nbytes)
        return FakeDeviceAllocation(address)

    def pagelocked_empty(self, shape: Any, dtype: Any) -> np.ndarray:
        self.host_allocations += 1
        return np.empty(shape, dtype)

    def memcpy_htod_async(self, dest: FakeDeviceAllocation, src: np.ndarray, stream: FakeStream) -> None:
        data = np.ascontiguousarray(src).tobytes()
        FakeCuda.memory[int(dest)][: len(data)] = data

    def memcpy_dtoh_async(self, dest: np.ndarray, src: FakeDeviceAllocation, stream: FakeStream) -> None:
        dest[:] = np.frombuffer(FakeCuda.memory[int(src)], np.uint8, dest.nbytes)
