"""The graphs the budget search measures: every unit behind a switch (``SwitchedInt8``), or a plan
with some units kept high (``keep_high``, ``build_int8``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx

from ...errors import ConfigError, TrtoptError
from ...executor.session import cpu_session
from ..fp16 import KeptNode
from ..int8 import FP32_SCALE_FLOOR, plan_int8, quantize_int8
from .metric import BatchOutputs


class SwitchedInt8:
    """Every unit's Q/DQ in one graph, each unit behind a switch: one session for the whole analysis.

    Building an INT8 graph (plan, insert Q/DQ, shape inference, checker) and
    an ONNX Runtime session for it took about 85% of each measurement on a
    6-layer BERT; the search makes one per assignment of units. Here each unit
    becomes ``If(keep_high_k)``, where ``keep_high_k`` is a boolean scalar graph
    input: its then-branch is the op on its float inputs, its else-branch the op
    on its Q/DQ outputs, so an assignment is a feed, not a graph. The outputs
    equal ``build_int8``'s graph for the same set: keeping a unit high there
    removes exactly those Q/DQ uses (``keep_high``). Only the branch taken runs,
    and each branch reads its weight where it lies; a ``Where`` between the two
    weights instead copied every weight on every run (two BERT-base layers: 105
    ms a run against 62 ms). The graph and session are made on the first
    ``run``, so a fully cached search builds nothing.
    """

    def __init__(
        self, model: onnx.ModelProto, amax: Mapping[str, float], plan_options: Mapping[str, Any],
        units: Mapping[str, str],
    ) -> None:
        self.model, self.amax, self.plan_options, self.units = model, amax, plan_options, list(units)
        self._session: Any = None
        self.switches: dict[str, str] = {}  # unit -> its switch input

    def graph(self) -> onnx.ModelProto:
        """The INT8 graph of every unit, with a switch input per unit (True: keep it high)."""
        graph = build_int8(self.model, self.amax, self.plan_options, frozenset())
        original = {node.name: list(node.input) for node in self.model.graph.node}
        weights = {init.name: init for init in self.model.graph.initializer}
        present = {init.name for init in graph.graph.initializer}
        switches: dict[str, str] = {}
        nodes = []
        for node in graph.graph.node:
            if node.name not in original or node.name not in self.units:
                nodes.append(node)
                continue
            switch = switches[node.name] = f"trtopt_keep_high_{len(switches)}"
            for name in original[node.name]:
                if name in weights and name not in present:
                    graph.graph.initializer.append(weights[name])  # the float weight, for the high branch
                    present.add(name)
            nodes.append(onnx.helper.make_node(
                "If", [switch], list(node.output), name=f"{node.name}__switch",
                then_branch=_branch(node, original[node.name], "high"),
                else_branch=_branch(node, list(node.input), "int8"),
            ))
            graph.graph.input.append(onnx.helper.make_tensor_value_info(switch, onnx.TensorProto.BOOL, []))
        del graph.graph.node[:]
        graph.graph.node.extend(nodes)
        missing = set(self.units) - set(switches)
        if missing:
            raise TrtoptError(f"internal: units {sorted(missing)[:3]} not found in their INT8 graph")
        self.switches = switches
        return graph

    def run(self, kept: frozenset[str], validation: Iterable[Mapping[str, np.ndarray]]) -> BatchOutputs:
        """Outputs on ``validation``, batch by batch, with the units in ``kept`` in float and the rest INT8."""
        if self._session is None:
            self._session = cpu_session(self.graph())
        unknown = kept - set(self.switches)
        if unknown:
            raise ConfigError(f"units {sorted(unknown)[:3]} are not quantized units of this graph")
        switches = {s: np.array(unit in kept) for unit, s in self.switches.items()}
        names = [o.name for o in self._session.get_outputs()]
        return (self._session.run(names, {**feed, **switches}) for feed in validation)


def _branch(node: onnx.NodeProto, inputs: list[str], tag: str) -> onnx.GraphProto:
    """A one-node graph computing ``node`` on ``inputs``, which it reads from the enclosing graph."""
    op = onnx.NodeProto()
    op.CopyFrom(node)
    op.name = f"{node.name}__{tag}"
    del op.input[:]
    op.input.extend(inputs)
    outputs = [f"{name}__{tag}" for name in node.output]
    del op.output[:]
    op.output.extend(outputs)
    return onnx.helper.make_graph(
        [op], op.name, [], [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs]
    )


def quantized_units(model: onnx.ModelProto, plan_options: Mapping[str, Any]) -> dict[str, str]:
    """The weighted ops ``plan_int8`` quantizes (name -> op type), in graph order."""
    quantized = {name for name, _, _ in plan_int8(model, **plan_options).weights}
    return {node.name: node.op_type for node in model.graph.node if node.name in quantized}


def keep_high(plan: Any, kept: Iterable[str], ops: Mapping[str, str], modules: Mapping[str, str] | None = None) -> Any:
    """``plan`` without the Q/DQ inputs of the units in ``kept``.

    Removing uses from the full plan (instead of planning again with more
    exclusions) keeps every remaining Q/DQ where it was, so the ranges of the one
    calibration of the full plan cover every assignment the search tries.
    """
    kept = set(kept)
    activations = {}
    for tensor, uses in plan.activations.items():
        remaining = [(node, index) for node, index in uses if node not in kept]
        if remaining:
            activations[tensor] = remaining
    return dataclasses.replace(  # keeps the plan's quantization format (INT8 or FP8)
        plan,
        activations=activations,
        weights=[w for w in plan.weights if w[0] not in kept],
        skipped=list(plan.skipped)
        + [
            KeptNode(name, ops.get(name, ""), "kept high by the accuracy budget", (modules or {}).get(name))
            for name in sorted(kept)
        ],
    )


def build_int8(
    model: onnx.ModelProto, amax: Mapping[str, float], plan_options: Mapping[str, Any], kept: Iterable[str]
) -> onnx.ModelProto:
    """The INT8 graph with the units in ``kept`` left in float (FP32 float part, for the analysis)."""
    ops = {node.name: node.op_type for node in model.graph.node}
    plan = keep_high(plan_int8(model, **plan_options), kept, ops)
    return quantize_int8(model, plan, amax, scale_floor=FP32_SCALE_FLOOR)[0]
