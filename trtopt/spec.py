"""What a compiled module accepts and returns: tensor specs, the output structure, dtypes.

Everything here is plain data shared by the exporter, the module, the
backends, calibration and the Triton exporter. Loading a saved module needs
only this (not the exporter).

Dtypes are named in one language throughout trtopt: numpy's dtype names
(``"float32"``, ``"int64"``, ...), the ``TensorSpec.dtype`` of a module. The
one ``DTYPES`` table says what each is called by ONNX, torch, TensorRT and
Triton; every conversion map below is read off it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
import torch

from .profiles import ShapeProfile
from .errors import ExportError

# ---------------------------------------------------------------------- dtypes


@dataclass(frozen=True)
class DType:
    """One dtype under each system's name; None where that system has no such type (or trtopt
    does not carry it across that boundary)."""

    name: str  # numpy dtype name: the TensorSpec language
    onnx: int | None  # onnx.TensorProto element type
    torch: torch.dtype | None
    tensorrt: str | None  # trt.DataType member name
    triton: str | None  # Triton model-config DataType enum name
    hint: str | None = None  # how a user converts a tensor or array to it, for error messages


_P = onnx.TensorProto
# Ordered as Triton's error message lists them (TRITON_DTYPES keeps this order).
DTYPES: tuple[DType, ...] = (
    DType("bool", _P.BOOL, torch.bool, "BOOL", "TYPE_BOOL", "x.bool() / x.astype(bool)"),
    DType("uint8", _P.UINT8, torch.uint8, "UINT8", "TYPE_UINT8"),
    DType("uint16", None, None, None, "TYPE_UINT16"),
    DType("uint32", None, None, None, "TYPE_UINT32"),
    DType("uint64", None, None, None, "TYPE_UINT64"),
    DType("int8", _P.INT8, torch.int8, "INT8", "TYPE_INT8"),
    DType("int16", None, None, None, "TYPE_INT16"),
    DType("int32", _P.INT32, torch.int32, "INT32", "TYPE_INT32", "x.int() / x.astype(np.int32)"),
    DType("int64", _P.INT64, torch.int64, "INT64", "TYPE_INT64", "x.long() / x.astype(np.int64)"),
    DType("float16", _P.FLOAT16, torch.float16, "HALF", "TYPE_FP16", "x.half() / x.astype(np.float16)"),
    DType("float32", _P.FLOAT, torch.float32, "FLOAT", "TYPE_FP32", "x.float() / x.astype(np.float32)"),
    # TensorRT engines carry no float64 I/O (trtopt's graphs never have it at the edge).
    DType("float64", _P.DOUBLE, torch.float64, None, "TYPE_FP64"),
    DType("bfloat16", _P.BFLOAT16, torch.bfloat16, "BF16", "TYPE_BF16"),
)
del _P

ONNX_TO_NUMPY: dict[int, str] = {d.onnx: d.name for d in DTYPES if d.onnx is not None}
TORCH_TO_NUMPY: dict[torch.dtype, str] = {d.torch: d.name for d in DTYPES if d.torch is not None}
NUMPY_TO_TORCH: dict[str, torch.dtype] = {d.name: d.torch for d in DTYPES if d.torch is not None}
TRT_TO_NUMPY: dict[str, str] = {d.tensorrt: d.name for d in DTYPES if d.tensorrt is not None}
TRITON_DTYPES: dict[str, str] = {d.name: d.triton for d in DTYPES if d.triton is not None}
CONVERT_HINT: dict[str, str] = {d.name: d.hint for d in DTYPES if d.hint is not None}


def conversion_hint(dtype: str) -> str:
    """How to convert an input to ``dtype`` (numpy name), for an error message."""
    return CONVERT_HINT.get(dtype, f"convert to {dtype}")


def onnx_dtype_name(elem_type: int) -> str:
    """The numpy name of an ONNX element type; an unknown type keeps its number, as a string."""
    return ONNX_TO_NUMPY.get(elem_type, str(elem_type))


# ----------------------------------------------------------------------- specs


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # str: a named dynamic dim


@dataclass(frozen=True)
class ModuleSpec:
    """What a compiled module accepts and returns; JSON-serialisable."""

    inputs: tuple[TensorSpec, ...]  # forward-argument order
    outputs: tuple[TensorSpec, ...]  # graph output order
    output_structure: dict[str, Any]
    profiles: tuple[ShapeProfile, ...]
    precision: str
    info: dict[str, Any] = field(default_factory=dict)  # exporter, cleanup and precision reports

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "output_structure": self.output_structure,
            "profiles": [p.to_json() for p in self.profiles],
            "precision": self.precision,
            "info": self.info,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModuleSpec:
        def spec(t: Mapping[str, Any]) -> TensorSpec:
            return TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))

        return cls(
            inputs=tuple(spec(t) for t in data["inputs"]),
            outputs=tuple(spec(t) for t in data["outputs"]),
            output_structure=data["output_structure"],
            profiles=tuple(ShapeProfile.from_json(p) for p in data["profiles"]),
            precision=data["precision"],
            info=dict(data.get("info", {})),
        )


def tensor_specs(values: Sequence[onnx.ValueInfoProto]) -> tuple[TensorSpec, ...]:
    """The specs of a graph's inputs or outputs."""
    specs = []
    for vi in values:
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)
        specs.append(TensorSpec(vi.name, onnx_dtype_name(tt.elem_type), shape))
    return tuple(specs)


# ------------------------------------------------------------ output structure
# A JSON-serialisable description of how a model's flat outputs nest, so the
# compiled module returns what the torch model returns (tensor, tuple, list, dict).


def flatten_outputs(obj: Any, prefix: str = "output") -> tuple[list[Any], dict[str, Any], list[str]]:
    """Flatten nested outputs in torch.export's (pytree) order: leaves, structure, leaf names."""
    if isinstance(obj, torch.Tensor):
        return [obj], {"type": "tensor"}, [prefix]
    if isinstance(obj, (tuple, list)):
        leaves, items, names = [], [], []
        for i, item in enumerate(obj):
            sub_leaves, sub_struct, sub_names = flatten_outputs(item, f"{prefix}_{i}")
            leaves += sub_leaves
            items.append(sub_struct)
            names += sub_names
        return leaves, {"type": "list" if isinstance(obj, list) else "tuple", "items": items}, names
    if isinstance(obj, dict):
        leaves, items, names, keys = [], [], [], []
        for key, item in obj.items():
            if not isinstance(key, str):
                raise ExportError(
                    f"the model returns a dict with a non-string key {key!r}; use string keys"
                )
            name = key if prefix == "output" else f"{prefix}_{key}"
            sub_leaves, sub_struct, sub_names = flatten_outputs(item, name)
            leaves += sub_leaves
            items.append(sub_struct)
            names += sub_names
            keys.append(key)
        return leaves, {"type": "dict", "keys": keys, "items": items}, names
    raise ExportError(
        f"the model returns a {type(obj).__name__}; outputs must be tensors, or tuples, lists "
        "and dicts of tensors"
    )


def unflatten_outputs(structure: dict[str, Any], leaves: Sequence[Any]) -> Any:
    """Inverse of ``flatten_outputs``."""
    it = iter(leaves)

    def build(node: dict[str, Any]) -> Any:
        kind = node["type"]
        if kind == "tensor":
            return next(it)
        items = [build(child) for child in node["items"]]
        if kind == "dict":
            return dict(zip(node["keys"], items))
        return items if kind == "list" else tuple(items)

    return build(structure)


def structure_leaves(structure: dict[str, Any], outputs: Any) -> list[Any]:
    """The leaves of nested ``outputs`` in flat order: the inverse of ``unflatten_outputs``."""
    kind = structure["type"]
    if kind == "tensor":
        return [outputs]
    items = [outputs[key] for key in structure["keys"]] if kind == "dict" else list(outputs)
    return [leaf for node, item in zip(structure["items"], items) for leaf in structure_leaves(node, item)]
