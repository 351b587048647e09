"""Settings: frozen dataclasses and enums, no heavy imports (shape profiles: ``profiles``).

``BuildConfig`` is the one typed settings object; ``compile(..., **overrides)``
applies keyword overrides to it with ``dataclasses.replace``. ``ENGINE_SETTINGS``
lists the fields that change the built engine: it is the engine-cache key.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from .errors import CalibrationError, ConfigError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    FP8 = "fp8"  # FP8 E4M3 Q/DQ: TensorRT on GPUs of compute capability 8.9+ (Ada, Hopper, Blackwell)
    INT4 = "int4"  # weight-only INT4 (W4A16): blocked DequantizeLinear, FP16 activations; Ampere+
    NVFP4 = "nvfp4"  # weight-only NVFP4 (FLOAT4E2M1, FP8 block scales); Blackwell (compute capability 10.0+)

    @property
    def quantized(self) -> bool:
        """INT8 and FP8: Q/DQ pairs with calibrated scales, the rest in ``int8_float_precision``."""
        return self in (Precision.INT8, Precision.FP8)

    @property
    def weight_only(self) -> bool:
        """INT4 and NVFP4: low-bit weights dequantized in front of MatMul/Gemm, no calibration needed."""
        return self in (Precision.INT4, Precision.NVFP4)


class Backend(str, enum.Enum):
    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class CalibratorKind(str, enum.Enum):
    """How an activation's INT8/FP8 range is chosen; see trtopt/calibrators/observers.py."""

    ENTROPY = "entropy"  # TensorRT's EntropyCalibration2 KL search (ties to the widest cut)
    MINMAX = "minmax"  # max |x|
    PERCENTILE = "percentile"  # the given percentile of |x|
    MSE = "mse"  # least expected quantization error over the histogram
    AUTO = "auto"  # per tensor, the least-error of the four that clips at most 0.1% of values


# The calibrator each quantized precision uses unless one is given. FP8 keeps max |x|: E4M3's
# exponent holds small values at the same relative precision as large ones, so clipping outliers
# gains little, and NVIDIA ModelOpt's FP8 recipe calibrates with max too (docs/precision.md has
# the measurements behind both defaults).
# INT8: auto, the best on the INT8 evaluation suite (benchmarks/int8_accuracy.py, docs/calibration.md).
DEFAULT_CALIBRATORS = {Precision.INT8: CalibratorKind.AUTO, Precision.FP8: CalibratorKind.MINMAX}
# Calibrator "percentile": the range holds this percentile of |x|.
DEFAULT_PERCENTILE = 99.99
# The FP16 keep-list keeps FP32 a node whose activations reach this on calibration data: a 4x
# margin under FP16's max (65504), because calibration data rarely shows the largest value the
# model will ever see.
DEFAULT_FP16_THRESHOLD = 16384.0


def calibrator_name(method: CalibratorKind | str) -> str:
    """The calibrator's name (``"entropy"``, ...) for a CalibratorKind or a string.

    The one check of a calibration method outside BuildConfig (whose fields raise
    ConfigError): ``calibrate``, the observers and the cache header all call it.
    """
    try:
        return CalibratorKind(method.value if isinstance(method, CalibratorKind) else method).value
    except ValueError:
        allowed = ", ".join(repr(k.value) for k in CalibratorKind)
        raise CalibrationError(f"method={method!r} is not a calibrator; use one of {allowed}") from None


_E = TypeVar("_E", bound=enum.Enum)


def _coerce_enum(enum_type: type[_E], value: Any, field: str) -> _E:
    try:
        return enum_type(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_type)
        raise ConfigError(f"{field}={value!r} is not valid; use one of {allowed}") from None


# BuildConfig.int8_layout: "tensorrt" (symmetric INT8, what TensorRT builds) or "cpu" (ONNX Runtime's
# integer kernels: uint8 activations with zero points, weights within +-63).
Int8Layout = Literal["tensorrt", "cpu"]
INT8_LAYOUTS: tuple[Int8Layout, ...] = get_args(Int8Layout)
# BuildConfig.int4_method: "rtn" (round to nearest, no data) or "awq" (activation-aware scales, needs
# calibration_data); int4_block_size: the block sizes TensorRT's INT4 weight-only GEMMs take.
Int4Method = Literal["rtn", "awq"]
INT4_METHODS: tuple[Int4Method, ...] = get_args(Int4Method)
# BuildConfig.hardware_compatibility: which GPUs a TensorRT engine may run on besides the one it was built on.
HardwareCompatibility = Literal["none", "ampere_plus", "same_compute_capability"]
HARDWARE_COMPATIBILITY: tuple[HardwareCompatibility, ...] = get_args(HardwareCompatibility)
INT4_BLOCK_SIZES = (64, 128)
# Opsets that first hold each weight-only format's DequantizeLinear (INT4 and block_size: 21; FLOAT4E2M1: 23).
WEIGHT_ONLY_OPSETS = {Precision.INT4: 21, Precision.NVFP4: 23}

@dataclass(frozen=True)
class BuildConfig:
    """Everything that controls compilation. Strings are accepted for the enums."""

    precision: Precision = Precision.FP32
    backend: Backend = Backend.AUTO
    opset: int = 19  # 19 is the first opset with FP16 Q/DQ scales (docs/precision.md)
    # Calibration (INT8, FP8 and the FP16 keep-list).
    calibrator: CalibratorKind | None = None  # None: the precision's default (DEFAULT_CALIBRATORS)
    percentile: float = DEFAULT_PERCENTILE
    calibration_batches: int | None = None  # None: use every batch given
    calibration_cache: str | None = None
    # Precision passes (trtopt.precision). Excluded nodes stay FP32: not quantized, not cast to FP16.
    # Globs on torch module paths ("encoder.layers.*.self_attn": a module takes everything inside it)
    # and on ONNX node names; these nodes stay FP32 and out of INT8 (trtopt/names.py).
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()  # ONNX op types, e.g. ("Softmax", "LayerNormalization")
    int8_keep_first_last: bool = False  # first/last weighted layers not quantized (run in int8_float_precision); INT8 and FP8
    int8_float_precision: Precision = Precision.FP16  # what the non-quantized rest of an INT8 or FP8 graph runs in
    # Quantize attention's activation-by-activation MatMuls too (TensorRT's INT8 attention fusion).
    int8_attention: bool = False
    # "tensorrt": symmetric INT8 as TensorRT builds it. "cpu": the layout ONNX Runtime's CPU integer
    # kernels run fastest (uint8 activations with zero points, weights within +-63, an FP32 float
    # part whatever int8_float_precision says); runs on the onnxruntime backend only.
    int8_layout: Int8Layout = "tensorrt"
    # SmoothQuant's migration strength alpha for MatMul/Gemm units (trtopt/precision/smoothquant.py); None: off.
    smoothquant: float | None = 0.85
    # precision="int4": weights in blocks of int4_block_size input channels, quantized by int4_method;
    # NVFP4 blocks are always 16. int4_cpu_accuracy_level: how ONNX Runtime's MatMulNBits computes an
    # INT4 graph on the onnxruntime backend (4: int8 activations per block, fastest; 1: FP32, the
    # dequantise-then-GEMM numbers TensorRT computes; the accuracy readout always uses those).
    int4_block_size: int = 128
    int4_method: Int4Method = "rtn"
    int4_cpu_accuracy_level: int = 4
    fp16_threshold: float = DEFAULT_FP16_THRESHOLD  # keep FP32 a node whose activations reach this on calibration data
    # Run the FP32 graph at every profile's min, opt and max shapes under ONNX Runtime at compile time, so a
    # range the model cannot take (a sequence past its position embeddings) fails there, not at call time.
    check_shapes: bool = True
    # The accuracy readout's top-1 agreement: True reads every 2-D float output as class logits, False
    # none, None those a Linear or softmax produces (an embedding is judged by cosine alone).
    classifier_outputs: bool | None = None
    # TensorRT engine settings.
    workspace_bytes: int | None = None  # None: TensorRT's default (the device's memory)
    optimization_level: int = 3  # builder_optimization_level, 0-5
    version_compatible: bool = False
    hardware_compatibility: HardwareCompatibility = "none"
    # TensorRT turns TF32 on by default, which rounds FP32 matmul/conv inputs to a 10-bit mantissa;
    # off here (as Polygraphy does), so an "fp32" engine computes what the CPU readout assumed.
    tf32: bool = False
    timing_cache: str | None = None
    engine_cache_dir: str | None = None  # None: no engine cache (see trtopt/backends/tensorrt/engine_cache.py)
    engine_cache_max_bytes: int = 8 << 30
    # TensorRT runtime settings (not part of the engine).
    cuda_graph: bool = False  # replay a captured CUDA graph for repeated input shapes
    # Accuracy-budget search: per-unit measurements, so another budget re-measures nothing.
    # None: $XDG_CACHE_HOME/trtopt/sensitivity (~/.cache/trtopt/sensitivity).
    sensitivity_cache_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", _coerce_enum(Precision, self.precision, "precision"))
        object.__setattr__(self, "backend", _coerce_enum(Backend, self.backend, "backend"))
        if self.calibrator is not None:
            object.__setattr__(
                self, "calibrator", _coerce_enum(CalibratorKind, self.calibrator, "calibrator")
            )
        for name in ("exclude_nodes", "exclude_op_types"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}={value!r} must be a list of strings")
            object.__setattr__(self, name, value)
        float_precision = _coerce_enum(Precision, self.int8_float_precision, "int8_float_precision")
        if float_precision.quantized:
            raise ConfigError(
                f"int8_float_precision={float_precision.value!r} is not valid; use 'fp16' (default) or 'fp32'"
            )
        object.__setattr__(self, "int8_float_precision", float_precision)
        if not float(self.fp16_threshold) > 0:
            raise ConfigError(
                f"fp16_threshold={self.fp16_threshold!r} must be positive (default {DEFAULT_FP16_THRESHOLD:g}; "
                "FP16's max is 65504)"
            )
        if not isinstance(self.opset, int) or self.opset < 17:
            raise ConfigError(f"opset={self.opset!r} is too old; use 17 or newer (19 recommended)")
        if self.precision is Precision.FP8 and self.opset < 19:
            raise ConfigError(
                f"precision='fp8' needs opset 19 or newer (FLOAT8E4M3FN Q/DQ), but opset={self.opset}; use opset=19"
            )
        if self.precision is Precision.INT8 and float_precision is Precision.FP16 and self.opset < 19:
            raise ConfigError(
                f"precision='int8' with int8_float_precision='fp16' needs opset 19 or newer (FP16 "
                f"Q/DQ scales), but opset={self.opset}; use opset=19 or int8_float_precision='fp32'"
            )
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile={self.percentile!r} must be in (0, 100], e.g. {DEFAULT_PERCENTILE:g}")
        self._check_int8_layout()
        self._check_weight_only()
        if self.smoothquant is not None and not (
            isinstance(self.smoothquant, (int, float)) and not isinstance(self.smoothquant, bool) and 0.0 < self.smoothquant < 1.0
        ):
            raise ConfigError(
                f"smoothquant={self.smoothquant!r} must be SmoothQuant's alpha, between 0 and 1 (default 0.85), "
                "or None to turn it off"
            )
        if self.classifier_outputs not in (None, True, False):
            raise ConfigError(
                f"classifier_outputs={self.classifier_outputs!r} must be True, False or None (decide from the graph)"
            )
        if self.calibration_batches is not None and self.calibration_batches < 1:
            raise ConfigError(
                f"calibration_batches={self.calibration_batches!r} must be a positive integer or None"
            )
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(
                f"optimization_level={self.optimization_level!r} must be between 0 and 5 (default 3)"
            )
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise ConfigError(
                f"hardware_compatibility={self.hardware_compatibility!r} must be 'none', "
                "'ampere_plus' or 'same_compute_capability'"
            )

        if self.engine_cache_max_bytes < 0:
            raise ConfigError(
                f"engine_cache_max_bytes={self.engine_cache_max_bytes!r} must be >= 0 (default 8 GiB)"
            )

    def _check_int8_layout(self) -> None:
        if self.int8_layout not in INT8_LAYOUTS:
            raise ConfigError(
                f"int8_layout={self.int8_layout!r} is not one of {', '.join(map(repr, INT8_LAYOUTS))}"
            )
        if self.int8_layout != "cpu":
            return
        if self.precision is not Precision.INT8:
            raise ConfigError(
                f"int8_layout='cpu' is an INT8 layout but precision={self.precision.value!r}; use precision='int8'"
            )
        if self.backend is Backend.TENSORRT:
            raise ConfigError(
                "int8_layout='cpu' writes uint8 activations with zero points, which TensorRT cannot build "
                "(it needs symmetric INT8): use backend='onnxruntime', or int8_layout='tensorrt' for TensorRT"
            )
        if self.int8_attention:
            # Attention's activation x activation MatMuls would be uint8 x uint8, which the CPU
            # layout's exactness argument (weights within +-63) does not cover.
            raise ConfigError(
                "int8_attention=True is for TensorRT's fused INT8 attention; int8_layout='cpu' quantizes "
                "weighted layers only: drop one of the two"
            )

    def _check_weight_only(self) -> None:
        if self.int4_block_size not in INT4_BLOCK_SIZES:
            raise ConfigError(
                f"int4_block_size={self.int4_block_size!r}: TensorRT's INT4 weight-only GEMMs take blocks of "
                f"{' or '.join(map(str, INT4_BLOCK_SIZES))} input channels; use one of those (default 128)"
            )
        if self.int4_method not in INT4_METHODS:
            raise ConfigError(f"int4_method={self.int4_method!r} is not one of {', '.join(map(repr, INT4_METHODS))}")
        if self.int4_cpu_accuracy_level not in (1, 2, 3, 4):
            raise ConfigError(
                f"int4_cpu_accuracy_level={self.int4_cpu_accuracy_level!r} must be 1 (FP32), 2 (FP16), 3 (BF16) "
                "or 4 (INT8 activations, default), ONNX Runtime's MatMulNBits accuracy levels"
            )

    @property
    def float_part_precision(self) -> Precision:
        """What the non-quantized part of an INT8 or FP8 graph runs in (FP32 in the CPU layout)."""
        return Precision.FP32 if self.int8_layout == "cpu" else self.int8_float_precision

    @property
    def calibration_method(self) -> CalibratorKind:
        """The calibrator this config uses: the one given, else its precision's default."""
        return self.calibrator or DEFAULT_CALIBRATORS.get(self.precision, CalibratorKind.ENTROPY)

    def replace(self, **overrides: Any) -> BuildConfig:
        """Return a copy with ``overrides`` applied; unknown names are a ConfigError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; BuildConfig has: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **overrides)


# The settings that change the built TensorRT engine (the engine-cache key).
ENGINE_SETTINGS: tuple[str, ...] = (
    "precision",
    "opset",
    "exclude_nodes",
    "exclude_op_types",
    "int8_keep_first_last",
    "int8_float_precision",
    "int8_attention",
    "smoothquant",
    "int4_block_size",
    "int4_method",
    "fp16_threshold",
    "workspace_bytes",
    "optimization_level",
    "version_compatible",
    "hardware_compatibility",
    "tf32",
)
