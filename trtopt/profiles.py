"""Optimization profiles: the shapes each input may take (``InputRange``, ``ShapeProfile``),
built from ``dynamic_shapes`` and checked against the graph. Frozen dataclasses, no heavy imports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class InputRange:
    """The shapes one input may take within one optimization profile."""

    name: str
    min: Shape
    opt: Shape
    max: Shape
    dynamic: tuple[int, ...] = ()  # the dims the user gave a range for

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= int(s) <= hi for s, lo, hi in zip(shape, self.min, self.max)
        )

    def describe(self) -> str:
        dims = []
        for lo, hi in zip(self.min, self.max):
            dims.append(str(lo) if lo == hi else f"{lo}..{hi}")
        return f"[{', '.join(dims)}]"


@dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile: a range for every input (static inputs have min = max)."""

    inputs: tuple[InputRange, ...]

    def __getitem__(self, name: str) -> InputRange:
        for r in self.inputs:
            if r.name == name:
                return r
        raise KeyError(name)

    def contains(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        return all(self[name].contains(shape) for name, shape in shapes.items())

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {
            r.name: {
                "min": list(r.min),
                "opt": list(r.opt),
                "max": list(r.max),
                "dynamic": list(r.dynamic),
            }
            for r in self.inputs
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, Sequence[int]]]) -> ShapeProfile:
        return cls(
            tuple(
                InputRange(
                    name,
                    tuple(v["min"]),
                    tuple(v["opt"]),
                    tuple(v["max"]),
                    tuple(v.get("dynamic", ())),
                )
                for name, v in data.items()
            )
        )


_SPEC_HELP = (
    "dynamic_shapes maps a forward argument name to {dim: (min, opt, max)}, "
    'e.g. {"x": {0: (1, 8, 32)}}; a list of such dicts gives several optimization profiles'
)


def _check_dim_range(name: str, dim: int, value: Any) -> tuple[int, int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(
            f"dynamic_shapes[{name!r}][{dim}] = {value!r} must be a (min, opt, max) tuple of ints; "
            + _SPEC_HELP
        )
    lo, opt, hi = value
    if lo < 1:
        raise ConfigError(
            f"dynamic_shapes[{name!r}][{dim}] = {tuple(value)}: min must be a positive integer"
        )
    if not lo <= opt <= hi:
        raise ConfigError(
            f"dynamic_shapes[{name!r}][{dim}] = {tuple(value)}: need min <= opt <= max"
        )
    return lo, opt, hi


def build_profiles(
    dynamic_shapes: Mapping[str, Mapping[int, Sequence[int]]]
    | Sequence[Mapping[str, Mapping[int, Sequence[int]]]]
    | None,
    example_shapes: Mapping[str, Shape],
) -> tuple[ShapeProfile, ...]:
    """Validate a user's ``dynamic_shapes`` spec and expand it into full-shape profiles.

    Dimensions the spec does not mention keep the example input's size. Every
    profile must make the same dimensions dynamic, so that the exported graph
    (which has one set of dynamic dims) fits all of them.
    """
    if dynamic_shapes is None:
        specs: list[Mapping[str, Any]] = [{}]
    elif isinstance(dynamic_shapes, Mapping):
        specs = [dynamic_shapes]
    elif isinstance(dynamic_shapes, Sequence) and not isinstance(dynamic_shapes, str):
        specs = list(dynamic_shapes)
        if not specs:
            raise ConfigError("dynamic_shapes is an empty list; " + _SPEC_HELP)
    else:
        raise ConfigError(f"dynamic_shapes has type {type(dynamic_shapes).__name__}; " + _SPEC_HELP)

    profiles = []
    dynamic_sets = []
    for index, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise ConfigError(f"dynamic_shapes[{index}] is a {type(spec).__name__}; " + _SPEC_HELP)
        unknown = [k for k in spec if k not in example_shapes]
        if unknown:
            raise ConfigError(
                f"dynamic_shapes names unknown input(s) {unknown}; the model's inputs are "
                f"{list(example_shapes)}"
            )
        ranges = []
        dynamic = set()
        for name, shape in example_shapes.items():
            lo, opt, hi = list(shape), list(shape), list(shape)
            dims = spec.get(name, {})
            if not isinstance(dims, Mapping):
                raise ConfigError(
                    f"dynamic_shapes[{name!r}] = {dims!r} must be a dict {{dim: (min, opt, max)}}; "
                    + _SPEC_HELP
                )
            for dim, value in dims.items():
                if not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
                    raise ConfigError(
                        f"dynamic_shapes[{name!r}] names dimension {dim!r}, but input {name!r} "
                        f"has rank {len(shape)} (shape {tuple(shape)})"
                    )
                d = dim % len(shape)
                lo[d], opt[d], hi[d] = _check_dim_range(name, dim, value)
                dynamic.add((name, d))
            ranges.append(
                InputRange(
                    name,
                    tuple(lo),
                    tuple(opt),
                    tuple(hi),
                    tuple(sorted(d for n, d in dynamic if n == name)),
                )
            )
        profiles.append(ShapeProfile(tuple(ranges)))
        dynamic_sets.append(dynamic)
    for index, dynamic in enumerate(dynamic_sets[1:], start=1):
        if dynamic != dynamic_sets[0]:
            diff = sorted(dynamic ^ dynamic_sets[0])
            raise ConfigError(
                f"optimization profile {index} makes different dimensions dynamic than profile 0 "
                f"(differing (input, dim): {diff}); every profile must give a range for the same dims"
            )
    return tuple(profiles)


def check_profiles_against_graph(
    profiles: Sequence[ShapeProfile], graph_shapes: Mapping[str, Sequence[int | str]]
) -> None:
    """Check profiles against the exported graph's input shapes.

    ``graph_shapes`` gives each graph input's dims: an int for a static dim, a
    symbol name for a dynamic one. A range on a static dim, a dynamic dim left
    without a range, or dims that share a symbol but get different ranges would
    make TensorRT reject the profile later; say so now, with the fix.
    """
    for index, profile in enumerate(profiles):
        for name, dims in graph_shapes.items():
            r = profile[name]
            if len(dims) != len(r.min):
                raise ConfigError(
                    f"input {name!r} has rank {len(dims)} in the graph but the profile gives rank {len(r.min)}"
                )
            for d, dim in enumerate(dims):
                span = (r.min[d], r.opt[d], r.max[d])
                if isinstance(dim, int):
                    if span != (dim, dim, dim):
                        raise ConfigError(
                            f"profile {index}: input {name!r} dimension {d} is fixed at {dim} by the "
                            f"model, but the profile asks for {span}; remove it from dynamic_shapes"
                        )
                elif d not in r.dynamic:
                    raise ConfigError(
                        f"input {name!r} dimension {d} is dynamic in the model ({dim!r}) but has no "
                        f"range; add it to dynamic_shapes, e.g. {{{name!r}: {{{d}: (1, 8, 32)}}}}"
                    )
        # Dims the exporter proved equal share a symbol: their ranges must agree.
        seen: dict[str, tuple[str, int, tuple[int, int, int]]] = {}
        for name, dims in graph_shapes.items():
            r = profile[name]
            for d, dim in enumerate(dims):
                if isinstance(dim, str) and dim:
                    span = (r.min[d], r.opt[d], r.max[d])
                    first = seen.setdefault(dim, (name, d, span))
                    if first[2] != span:
                        raise ConfigError(
                            f"profile {index}: {first[0]!r} dim {first[1]} and {name!r} dim {d} must "
                            f"be equal in this model, but their ranges differ ({first[2]} vs {span}); "
                            "give them the same (min, opt, max)"
                        )

