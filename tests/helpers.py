"""Helpers shared by several test files: assertions, small models and the inputs of the TensorRT doubles.

Test files import from here (or get fixtures from conftest.py), never from each other.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from trtopt import cli
from trtopt.profiles import InputRange, ShapeProfile
from trtopt.runtime import TensorRTBackend
from trtopt.spec import ModuleSpec, TensorSpec


def flat(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [leaf for v in obj.values() for leaf in flat(v)]
    if isinstance(obj, (tuple, list)):
        return [leaf for v in obj for leaf in flat(v)]
    return [obj]


def same_structure(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_structure(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_structure, a, b))
    return isinstance(b, type(a))


def max_relative_error(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max |expected| over all leaves (a scale-aware relative error).

    A missing or extra output is an AssertionError, not a pass: the leaves are counted first.
    """
    actual_leaves, expected_leaves = flat(actual), flat(expected)
    assert len(actual_leaves) == len(expected_leaves), (
        f"{len(actual_leaves)} output(s) where {len(expected_leaves)} were expected"
    )
    worst = 0.0
    for x, y in zip(actual_leaves, expected_leaves):
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        assert x.shape == y.shape, (x.shape, y.shape)
        scale = max(float(np.abs(y).max()), 1e-12)
        worst = max(worst, float(np.abs(x - y).max()) / scale)
    return worst


# ------------------------------------------------ TensorRT doubles: a network, profiles, fake engines
# For tests/trt_doubles.py: FakeTensorRT parses ``relu_model`` and deserializes the ``ENGINE`` plans.
def relu_model(dims: tuple = ("batch", 4), op: str = "Relu") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))
    node = helper.make_node(op, ["x"], ["y"], name="act0")
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 19)])


def profile(lo: int = 1, opt: int = 8, hi: int = 32, name: str = "x") -> ShapeProfile:
    return ShapeProfile((InputRange(name, (lo, 4), (opt, 4), (hi, 4), (0,)),))


PROFILES = (
    ShapeProfile((InputRange("x", (1, 4), (4, 4), (8, 4), (0,)),)),
    ShapeProfile((InputRange("x", (9, 4), (16, 4), (32, 4), (0,)),)),
)
SPEC = ModuleSpec(
    inputs=(TensorSpec("x", "float32", ("batch", 4)),),
    outputs=(TensorSpec("x_out", "float32", ("batch", 4)),),
    output_structure={"type": "tensor"},
    profiles=PROFILES,
    precision="fp32",
)
ENGINE = b'FAKE-ENGINE{"inputs": ["x"], "profiles": [{"x": [[1, 4], [4, 4], [8, 4]]}, {"x": [[9, 4], [16, 4], [32, 4]]}]}'

SPEC_DD = ModuleSpec(
    inputs=(TensorSpec("x", "float32", ("batch", 4)),),
    outputs=(TensorSpec("x_out", "float32", ("n",)),),
    output_structure={"type": "tensor"},
    profiles=PROFILES,
    precision="fp32",
)
ENGINE_DD = ENGINE[:-1] + b', "data_dependent": ["x_out"]}'


def graph_backend(plan_extras: dict | None = None) -> TensorRTBackend:
    engine = ENGINE
    if plan_extras:
        engine = ENGINE[:-1] + b", " + json.dumps(plan_extras)[1:].encode()
    return TensorRTBackend(engine, SPEC, cuda_graph=True)


# ------------------------------------------------------------------ the command line
FACTORY = textwrap.dedent(
    """
    import torch

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    def make():
        torch.manual_seed(0)
        return Small().eval(), (torch.randn(2, 3, 8, 8),)

    def make_wrong():
        return torch.nn.Identity()
    """
)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("trtopt: error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# ------------------------------------------------------- INT8 calibration: NVIDIA's reference
LEVELS = 128


def nvidia_entropy_cut(hist: np.ndarray, levels: int = LEVELS) -> int:
    """NVIDIA's ``_compute_amax_entropy`` (pytorch-quantization; ModelOpt 0.47 is the same),
    transcribed one cut at a time: bin 0 takes bin 1's count; bin b of cut i goes to level
    ``digitize(b, linspace(0, i, 129)) - 1``; empty bins get no mass; scipy's ``entropy``
    (normalises both, inf where Q is 0 and P is not); the LAST cut of least KL wins.
    The inner Python loops over bins are written with numpy; the arithmetic is the same."""
    from scipy.stats import entropy

    bins = np.array(hist, dtype=np.float64)
    bins[0] = bins[1]
    divergences = []
    for i in range(levels, len(bins) + 1):
        space = np.linspace(0, i, levels + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        used = digitized != -1
        density = np.bincount(digitized[used], weights=bins[:i][used], minlength=levels)
        members = np.bincount(digitized[used], minlength=levels)
        density = np.divide(density, members, out=np.zeros(levels), where=members > 0)
        new_density = np.where(used, density[np.maximum(digitized, 0)], 0.0)
        reference = bins[:i].copy()
        reference[-1] += bins[i:].sum()
        with np.errstate(invalid="ignore"):  # a cut holding only the emptied bin 0: 0/0, as in NVIDIA's code
            divergences.append(entropy(reference / reference.sum(), new_density / new_density.sum()))
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
    return levels + last_argmin
