"""The ``trtopt`` command line: compile, bench, inspect, export-triton, serve.

Every subcommand is a thin layer over the library (``trtopt.compile``,
``trtopt.bench``, ``CompiledModule``); errors trtopt raises on purpose are
printed as one line, ``trtopt: error: ...``, with exit status 1 (argparse's
usage errors exit with 2). Progress goes to stderr through ``logging``
(``-v`` for debug detail, ``-q`` for warnings only); results go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper

import trtopt

from . import __version__, bench
from .compiler import load_source, read_onnx_file
from .config import DEFAULT_CALIBRATORS, INT8_LAYOUTS, Backend, BuildConfig, CalibratorKind, Precision
from .errors import ConfigError, InputError, ServeError, TrtoptError, first_line
from .export import forward_input_names, resize_dim
from .files import atomic_write
from .graph import graph_input_shapes
from .module import read_module_file
from .names import ROOT, added_by, module_of
from .precision.report import PrecisionReport
from .serve import DEFAULT_HOST, serve

logger = logging.getLogger(__name__)

SHAPES_HELP = """\
shapes (--shapes NAME:MIN,OPT,MAX), trtexec's dims notation:
  --shapes x:1x3x224x224,8x3x224x224,32x3x224x224
      input x takes batch 1..32 (optimised for 8): the dims that differ
      between MIN and MAX are the dynamic ones.
  --shapes x:1x3x224x224
      one shape: MIN = OPT = MAX (a static input, or a fixed size for a
      dimension the ONNX file leaves dynamic).
  Several inputs: repeat --shapes, once per input.
  Several optimization profiles: repeat --shapes for the same input; its
  k-th --shapes belongs to profile k. An input given once gets the same range
  in every profile. E.g. two profiles, small and large batches:
      --shapes x:1x3x224x224,4x3x224x224,8x3x224x224 \\
      --shapes x:9x3x224x224,32x3x224x224,64x3x224x224
  Unlike trtexec, MIN,OPT,MAX are one option (trtexec has --minShapes,
  --optShapes, --maxShapes, and separates inputs with commas).
"""

SOURCE_HELP = """\
SOURCE is an ONNX file (model.onnx), a torch.export.save file (model.pt2), a
TorchScript archive from torch.jit.save (model.pt; give every input's shapes
with --shapes: its examples are float32 random tensors at the OPT shapes), or a
Python factory MODULE:FUNCTION that returns (model, example_inputs), e.g.
mypkg.models:make_resnet or ./models.py:make_resnet (the current directory is
importable).
"""


# ------------------------------------------------------------------ shapes


def parse_dims(text: str, context: str) -> tuple[int, ...]:
    """``1x3x224x224`` -> ``(1, 3, 224, 224)``."""
    parts = text.strip().lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not text.strip() or not dims or any(d < 1 for d in dims):
        raise ConfigError(
            f"{context}: {text!r} is not a shape; write positive dims joined by 'x', e.g. 1x3x224x224"
        )
    return dims


def parse_shape_option(text: str) -> tuple[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``name:min,opt,max`` (or ``name:shape``) -> ``(name, (min, opt, max))``.

    The name is split at the last ``:`` because ONNX input names may contain
    one (``input:0``) while shapes never do.
    """
    name, sep, spec = text.rpartition(":")
    if not sep or not name:
        raise ConfigError(
            f"--shapes {text!r}: write NAME:MIN,OPT,MAX, e.g. x:1x3x224x224,8x3x224x224,32x3x224x224"
        )
    shapes = [parse_dims(s, f"--shapes {text!r}") for s in spec.split(",")]
    if len(shapes) == 1:
        shapes *= 3
    if len(shapes) != 3:
        raise ConfigError(
            f"--shapes {text!r} gives {len(shapes)} shapes; give one (static) or three (MIN,OPT,MAX)"
        )
    if len({len(s) for s in shapes}) != 1:
        raise ConfigError(f"--shapes {text!r}: MIN, OPT and MAX must have the same rank")
    return name, (shapes[0], shapes[1], shapes[2])


def shapes_to_profiles(options: Sequence[str]) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """Group repeated ``--shapes`` into optimization profiles (the k-th mention of an input -> profile k)."""
    per_input: dict[str, list[tuple[tuple[int, ...], ...]]] = {}
    for option in options:
        name, triple = parse_shape_option(option)
        per_input.setdefault(name, []).append(triple)
    count = max((len(v) for v in per_input.values()), default=0)
    for name, triples in per_input.items():
        if len(triples) not in (1, count):
            raise ConfigError(
                f"--shapes gives input {name!r} {len(triples)} times but another input {count} times; "
                f"give each input once (same range in every profile) or {count} times (one per profile)"
            )
    return [{name: triples[k if len(triples) > 1 else 0] for name, triples in per_input.items()} for k in range(count)]


def dynamic_shapes_from_profiles(
    profiles: Sequence[Mapping[str, tuple[tuple[int, ...], ...]]],
    reference: Mapping[str, Sequence[int | str]],
    source: str,
) -> dict[str, dict[int, tuple[int, int, int]]] | list[dict[str, dict[int, tuple[int, int, int]]]] | None:
    """Turn full min/opt/max shapes into trtopt's ``dynamic_shapes``.

    ``reference`` gives each input's dims as the model has them (the example
    input's size, or an ONNX file's dim: an int, or a symbol for a dynamic
    dim). A dim is dynamic when its min and max differ in any profile, or when
    the ONNX file leaves it symbolic; every other dim must match the model.
    """
    if not profiles:
        return None
    dynamic: dict[str, set[int]] = {}
    for profile in profiles:
        for name, (lo, _opt, hi) in profile.items():
            if name not in reference:
                raise ConfigError(
                    f"--shapes names input {name!r}, but the {source} has inputs {list(reference)}"
                )
            dims = reference[name]
            if len(lo) != len(dims):
                raise ConfigError(
                    f"--shapes gives input {name!r} rank {len(lo)}, but the {source} has rank {len(dims)} "
                    f"({'x'.join(str(d) for d in dims)})"
                )
            dyn = dynamic.setdefault(name, set())
            dyn.update(d for d in range(len(dims)) if lo[d] != hi[d] or isinstance(dims[d], str))
    for profile in profiles:
        for name, (lo, _opt, _hi) in profile.items():
            for d, model_dim in enumerate(reference[name]):
                if d not in dynamic[name] and lo[d] != model_dim:
                    raise ConfigError(
                        f"--shapes fixes input {name!r} dim {d} at {lo[d]}, but the {source} has "
                        f"{model_dim} there; use {model_dim}, or give a MIN,OPT,MAX range for that dim"
                    )
    specs = [
        {
            name: {d: (lo[d], opt[d], hi[d]) for d in sorted(dynamic[name])}
            for name, (lo, opt, hi) in profile.items()
            if dynamic[name]
        }
        for profile in profiles
    ]
    return specs[0] if len(specs) == 1 else specs


# ----------------------------------------------------------------- sources


def is_onnx_file(source: str) -> bool:
    return source.lower().endswith(".onnx")


# Saved model files `trtopt compile` reads besides ONNX (what trtopt.compile accepts as a path).
TORCH_FILE_SUFFIXES = (".pt", ".pt2", ".jit", ".ts")


def is_torch_file(source: str) -> bool:
    return source.lower().endswith(TORCH_FILE_SUFFIXES)


def load_torch_file(source: str, shape_options: Sequence[str]) -> tuple[Any, tuple[Any, ...]]:
    """A ``torch.export.save`` (.pt2) or ``torch.jit.save`` file, and example inputs for it.

    An ExportedProgram carries its examples. A TorchScript archive does not: its
    examples are float32 random tensors at the first profile's OPT shapes from
    ``--shapes`` (models taking other dtypes need a factory).
    """
    model = load_source(_check_file(source, "model file"))
    if isinstance(model, torch.export.ExportedProgram):
        examples = model.example_inputs[0] if model.example_inputs else None
        if not examples:
            raise ConfigError(f"{source} holds no example inputs; save it with torch.export.save from torch.export.export")
        return model, tuple(examples)
    profiles = shapes_to_profiles(shape_options)
    names = forward_input_names(model, len(model.forward.schema.arguments) - 1)
    missing = [n for n in names if not profiles or n not in profiles[0]]
    if missing:
        example = f"--shapes {missing[0]}:1x3x224x224"
        raise ConfigError(
            f"{source} is a TorchScript archive, which keeps no input shapes: give --shapes for "
            f"{', '.join(map(repr, missing))} (e.g. {example}), or compile it from a MODULE:FUNCTION factory"
        )
    torch.manual_seed(0)
    return model, tuple(torch.randn(profiles[0][n][1]) for n in names)


def _user_code_error(what: str, exc: Exception) -> ConfigError:
    """The user's code raised: one line for the terminal (the README's promise), the traceback under -v."""
    logger.debug("%s raised:", what, exc_info=exc)
    return ConfigError(f"{what} raised {type(exc).__name__}: {first_line(exc)} (run with -v for the traceback)")


def load_factory(source: str) -> tuple[Any, tuple[Any, ...]]:
    """Call a ``module:function`` factory; return ``(model, example_inputs)``."""
    module_name, sep, func_name = source.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(
            f"{source!r} is neither a model file (.onnx, .pt2, .pt) nor a MODULE:FUNCTION factory, "
            "e.g. mypkg.models:make_model"
        )
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"factory file {path} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:  # no loader takes the file (a .py always has one)
            raise ConfigError(f"factory file {path} cannot be imported as a Python module; give a .py file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's code
            raise _user_code_error(f"importing {path} for factory {source!r}", exc) from exc
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")  # like `python -m`: modules in the current directory import
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"cannot import {module_name!r} for factory {source!r} ({exc}); check the name and PYTHONPATH"
            ) from None
        except Exception as exc:  # the user's module raised while importing
            raise _user_code_error(f"importing {module_name!r} for factory {source!r}", exc) from exc
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ConfigError(f"{module_name!r} has no function {func_name!r} (factory {source!r})")
    try:
        made = factory()
    except Exception as exc:  # the user's code
        raise _user_code_error(f"factory {source!r}", exc) from exc
    if not isinstance(made, (tuple, list)) or len(made) != 2:
        raise InputError(
            f"factory {source!r} returned a {type(made).__name__}; it must return (model, example_inputs)"
        )
    model, examples = made
    examples = (examples,) if isinstance(examples, torch.Tensor) else tuple(examples)
    return model, examples


def reference_shapes(source: str, model: Any, examples: Sequence[Any]) -> tuple[dict[str, list[int | str]], str]:
    """The dims ``--shapes`` is checked against: the ONNX file's inputs or the example inputs."""
    if model is None:
        proto = read_onnx_file(source, load_external_data=False)  # only the inputs' shapes are needed
        return graph_input_shapes(proto), "ONNX file"
    names = forward_input_names(model, len(examples))
    return {n: list(t.shape) for n, t in zip(names, examples)}, "model"


def _check_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    return p


# ------------------------------------------------------------- subcommands


def cmd_compile(args: argparse.Namespace) -> int:
    if is_onnx_file(args.source):
        _check_file(args.source, "ONNX file")
        model, examples = None, None
    elif is_torch_file(args.source):
        model, examples = load_torch_file(args.source, args.shapes)
    else:
        model, examples = load_factory(args.source)
    dynamic = None
    if args.shapes:
        reference, what = reference_shapes(args.source, model, examples or ())
        dynamic = dynamic_shapes_from_profiles(shapes_to_profiles(args.shapes), reference, what)
    overrides: dict[str, Any] = {}
    calibration = None
    if args.calib:
        calibration = str(_check_file(args.calib, "calibration file"))
        if not calibration.endswith(".npz"):
            raise ConfigError(f"--calib {calibration}: give a .npz file of arrays keyed by input name")
    for option, setting in (("calibrator", "calibrator"), ("calib_batches", "calibration_batches"),
                            ("calib_cache", "calibration_cache"), ("int8_layout", "int8_layout")):
        value = getattr(args, option)
        if value is not None:
            overrides[setting] = value
    budget = None
    if args.accuracy_budget:
        budget = trtopt.AccuracyBudget.parse(args.accuracy_budget, best_effort=args.best_effort)
    if args.exclude:
        overrides["exclude_nodes"] = tuple(args.exclude)
    if args.exclude_op_types:
        overrides["exclude_op_types"] = tuple(args.exclude_op_types)
    if args.smoothquant is not None:  # not given: the config's default
        overrides["smoothquant"] = None if args.smoothquant == "off" else args.smoothquant
    validation = None
    if args.validation:
        if args.precision == "fp32":
            raise ConfigError("--validation judges an fp16, int8 or fp8 module against FP32; it is not used at fp32")
        validation = str(_check_file(args.validation, "validation file"))
    logger.info("compiling %s at %s", args.source, args.precision)
    module = trtopt.compile(
        str(Path(args.source)) if model is None else model,
        examples,
        precision=args.precision,
        backend=args.backend,
        dynamic_shapes=dynamic,
        calibration_data=calibration,
        accuracy_budget=budget,
        validation_data=validation,
        **overrides,
    )
    out = Path(args.output) if args.output else Path(Path(args.source.split(":")[-1]).stem + ".trtopt")
    module.save(out)
    logger.info("wrote %s (%s)", out, _size(out.stat().st_size))
    budget_report = module.precision_report.accuracy_budget  # set whenever compile took a budget
    if budget_report is not None:
        print(budget_report.table(), file=sys.stderr)
    if args.emit_onnx:
        for kind, path in module.export_onnx(args.emit_onnx).items():
            logger.info("wrote %s: %s", kind, path)
    print(out)
    return 0


def _load_bench_module(args: argparse.Namespace) -> Any:
    """The module file ``bench`` times; --precision and --calib would be ignored on it, so they are refused."""
    _check_file(args.source, "module file")
    module = trtopt.load(args.source, backend=args.backend, allow_host_code=args.allow_host_code)
    if args.precision not in (None, [module.precision]) or args.calib:
        given = "--calib" if args.calib else f"--precision {','.join(args.precision)}"
        raise ConfigError(
            f"{given} applies to a factory; {args.source} is already compiled at {module.precision}. "
            "Compile the model again at that precision (`trtopt compile SOURCE --precision P`) and bench "
            "that file, or bench a MODULE:FUNCTION factory with --precision to compare precisions"
        )
    return module


def cmd_bench(args: argparse.Namespace) -> int:
    batch_sizes = args.batch_sizes
    if args.source.endswith(".trtopt"):
        module = _load_bench_module(args)
        batches = batch_sizes or [module.profiles[0][module.input_names[0]].opt[0]]
        candidates = [
            bench.compiled_candidate(Path(args.source).stem, module, artifact_bytes=Path(args.source).stat().st_size)
        ]

        def make_inputs(batch: int) -> list[Any]:
            return bench.inputs_for_spec(module.spec, batch)

    elif is_onnx_file(args.source) or is_torch_file(args.source):
        raise ConfigError(
            f"trtopt bench takes a .trtopt file or a MODULE:FUNCTION factory; compile {args.source} "
            "first with `trtopt compile`"
        )
    else:
        model, examples = load_factory(args.source)
        name = args.source.rpartition(":")[2]
        reference_names = list(reference_shapes(args.source, model, examples)[0])
        batches = batch_sizes or [int(examples[0].shape[0])]

        def make_inputs(batch: int) -> list[Any]:
            return [resize_dim(t, 0, batch) for t in examples]

        dynamic = None
        if len(set(batches) | {int(examples[0].shape[0])}) > 1:
            lo, hi = min(batches), max(batches)
            dynamic = {n: {0: (lo, hi, hi)} for n in reference_names}  # dim 0 is the batch
        reference = bench.torch_reference(model, examples, max(batches))
        calibration = str(_check_file(args.calib, "calibration file")) if args.calib else None
        candidates = [bench.torch_candidate(name, model)]
        for precision in args.precision or ["fp32"]:
            logger.info("compiling %s at %s", name, precision)
            candidates.append(
                bench.trtopt_candidate(
                    name,
                    model,
                    make_inputs(max(batches)),
                    precision=precision,
                    backend=args.backend,
                    dynamic_shapes=dynamic,
                    calibration_data=calibration if precision != "fp32" else None,
                    eval_inputs=examples,
                    reference=reference,
                    eval_chunk=max(batches),
                )
            )
    logger.info("timing batch sizes %s, %d iterations", ",".join(map(str, batches)), args.iterations)
    results = bench.run_side_by_side(candidates, make_inputs, batches, warmup=args.warmup,
                                     iterations=args.iterations, threads=args.threads)
    report = bench.BenchReport(
        results=results,
        settings={"source": args.source, "batch_sizes": batch_sizes, "warmup": args.warmup,
                  "iterations": args.iterations, "backend": args.backend, "threads": args.threads},
    )
    print(report.markdown())
    if args.json == "-":
        print(json.dumps(report.to_json(), indent=1))
    elif args.json:
        logger.info("wrote %s", report.write_json(args.json))
    failed = sum(r.status == "failed" for r in results)
    if failed:
        print(f"trtopt: error: {failed} of {len(results)} variants failed; the notes under the table say why",
              file=sys.stderr)
        return 1
    return 0


def describe_module(path: str) -> dict[str, Any]:
    """What ``trtopt inspect`` shows, as a JSON-serialisable dict."""
    onnx_model, spec, engine = read_module_file(path)
    ops = Counter(node.op_type for node in onnx_model.graph.node)
    weights: Counter[str] = Counter()
    for init in onnx_model.graph.initializer:
        name, count = _stored_bytes(init)
        weights[name] += count
    return {
        "file": str(path),
        "bytes": Path(path).stat().st_size,
        "precision": spec.precision,
        "engine_bytes": len(engine) if engine is not None else None,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.outputs],
        "profiles": [p.to_json() for p in spec.profiles],
        "graph": {
            "nodes": len(onnx_model.graph.node),
            "quantize_dequantize_nodes": ops["QuantizeLinear"] + ops["DequantizeLinear"],
            "cast_nodes": ops["Cast"],
            "weight_bytes_by_dtype": dict(weights),
            "op_types": dict(ops.most_common()),
        },
        "modules": _module_summary(onnx_model),
        "info": spec.info,
    }


# 4-bit element types: two codes share a byte as stored (numpy's view of them takes one byte each).
_FOUR_BIT_TYPES = ("INT4", "UINT4", "FLOAT4E2M1")


def _stored_bytes(init: Any) -> tuple[str, int]:
    """An initializer's element type (numpy's name) and the bytes its values take as stored."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    if onnx.TensorProto.DataType.Name(init.data_type) in _FOUR_BIT_TYPES:
        return dtype.name, (math.prod(init.dims) + 1) // 2
    if dtype.kind == "O":  # strings: their length is in the data
        return dtype.name, int(numpy_helper.to_array(init).nbytes)
    return dtype.name, math.prod(init.dims) * dtype.itemsize


def _module_summary(onnx_model: Any) -> dict[str, Any] | None:
    """Per top-level torch module: its nodes, and how many run in INT8, FP16 or FP32; None without module paths.

    A node counts as INT8 when a DequantizeLinear feeds it, FP16 when one of its
    outputs is float16, else FP32 (nodes that compute no floats, such as shape
    arithmetic, count as FP32).
    """
    typed = {vi.name: vi.type.tensor_type.elem_type for vi in [*onnx_model.graph.value_info, *onnx_model.graph.output]}
    dq_outputs = {o for n in onnx_model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    tops: dict[str, dict[str, int]] = {}
    leaves: set[str] = set()
    for node in onnx_model.graph.node:
        module = module_of(node)
        if module is None:
            continue
        leaves.add(module)
        entry = tops.setdefault(module.split(".")[0] if module else ROOT, {"nodes": 0, "added": 0, "int8": 0, "fp16": 0, "fp32": 0})
        entry["nodes"] += 1
        if added_by(node):
            entry["added"] += 1  # Casts, Q/DQ and SmoothQuant Muls the precision passes inserted
            continue
        if any(name in dq_outputs for name in node.input):
            entry["int8"] += 1
        elif any(typed.get(name) == onnx.TensorProto.FLOAT16 for name in node.output):
            entry["fp16"] += 1
        else:
            entry["fp32"] += 1
    if not tops:
        return None
    return {"leaf_modules": len(leaves), "top_level": tops}


def _dims(shape: Sequence[int | str]) -> str:
    return "x".join(str(d) for d in shape)


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _check_module_file(path: str) -> Path:
    """A .trtopt module file; an ONNX or torch model file is named as such, with the command that makes one."""
    if is_onnx_file(path) or is_torch_file(path):
        kind = "an ONNX file" if is_onnx_file(path) else "a PyTorch model file"
        raise ConfigError(
            f"{path} is {kind}, not a trtopt module file; compile it first (`trtopt compile {path} "
            f"-o {Path(path).stem}.trtopt`) and pass the .trtopt file"
        )
    return _check_file(path, "module file")


def cmd_inspect(args: argparse.Namespace) -> int:
    desc = describe_module(_check_module_file(args.module).as_posix())
    if args.json:
        print(json.dumps(desc, indent=1))
        return 0
    print("\n".join(_inspect_lines(desc)))
    return 0


def _inspect_lines(desc: Mapping[str, Any]) -> list[str]:
    """``trtopt inspect``'s text: the file, its tensors and profiles, precision, and torch modules."""
    g = desc["graph"]
    lines = [
        f"{desc['file']}: {_size(desc['bytes'])}, precision {desc['precision']}, "
        + (f"TensorRT engine {_size(desc['engine_bytes'])}" if desc["engine_bytes"] else "no TensorRT engine (ONNX graph only)"),
        "inputs:",
        *(f"  {t['name']}: {t['dtype']} [{', '.join(map(str, t['shape']))}]" for t in desc["inputs"]),
        "outputs:",
        *(f"  {t['name']}: {t['dtype']} [{', '.join(map(str, t['shape']))}]" for t in desc["outputs"]),
        f"optimization profiles: {len(desc['profiles'])}",
    ]
    for index, profile in enumerate(desc["profiles"]):
        for name, r in profile.items():
            lines.append(f"  [{index}] {name}: min {_dims(r['min'])}  opt {_dims(r['opt'])}  max {_dims(r['max'])}")
    weights = ", ".join(f"{k} {_size(v)}" for k, v in sorted(g["weight_bytes_by_dtype"].items()))
    lines += [
        "precision summary:",
        f"  {g['nodes']} nodes; {g['quantize_dequantize_nodes']} Quantize/DequantizeLinear; {g['cast_nodes']} Cast",
        f"  weights: {weights or 'none'}",
    ]
    lines += _precision_lines(PrecisionReport.from_json(desc["info"].get("precision") or {}))
    lines += _module_lines(desc.get("modules"))
    for key in ("exporter", "opset", "cleanup"):
        if key in desc["info"]:
            lines.append(f"{key}: {desc['info'][key]}")
    return lines


def _precision_lines(report: Any) -> list[str]:
    """One line per entry of the precision report, in the order the module file keeps them."""
    described = {
        # One range per quantized tensor: a count is what a reader wants.
        "activation_amax": lambda: f"{len(report.activation_amax)} calibrated tensors (--json lists them)",
        "accuracy": lambda: report.accuracy.describe()
        + ("" if report.accuracy.ok else " -- drifts from FP32 (see docs/calibration.md)"),
        "range_checks": lambda: _describe_range_checks(report.range_checks),
        "smoothquant": lambda: _describe_smoothquant(report.smoothquant),
        "accuracy_budget": lambda: _describe_budget(report.accuracy_budget),
    }
    lines = []
    for key, value in report.to_json().items():
        if key in described and getattr(report, key, None) is not None:
            value = described[key]()
        elif isinstance(value, (list, tuple)):  # nodes: count, and the first few
            shown = ", ".join(_node_entry(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
            value = f"{len(value)}" + (f" ({shown})" if value else "")
        elif isinstance(value, dict):
            value = json.dumps(value)
        lines.append(f"  {key}: {value}")
    return lines


def _describe_range_checks(checks: Mapping[str, Mapping[str, Any]]) -> str:
    worst = sorted(checks.items(), key=lambda item: (-item[1]["clipped"], -item[1]["error"]))[:3]
    return f"{len(checks)} ranges checked; worst: " + ", ".join(
        f"{name}{' into ' + c['module'] if c.get('module') else ''} clips {c['clipped']:.2%} "
        f"(error {c['error']:.3g}, {c['method']})"
        for name, c in worst
    )


def _describe_smoothquant(smoothquant: Mapping[str, Any]) -> str:
    tensors = smoothquant.get("tensors", [])
    folded = sum(t.get("folded_into") is not None for t in tensors)
    return f"alpha {smoothquant.get('alpha')}: {len(tensors)} activation(s) smoothed, {folded} folded into a LayerNormalization"


def _describe_budget(budget: Any) -> str:
    kept = budget.kept_high
    return (
        f"{budget.budget}: {'met' if budget.met else 'NOT met'}, final {budget.final:.6g}, "
        f"{len(kept)} unit(s) kept high" + (f" ({', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''})" if kept else "")
    )


def _module_lines(modules: Mapping[str, Any] | None) -> list[str]:
    """Per top-level torch module, how many nodes run in each precision."""
    if not modules:
        return ["torch modules: none recorded (an ONNX input, the TorchScript exporter or an older trtopt); "
                "nodes carry their ONNX names"]
    lines = [f"torch modules: {modules['leaf_modules']} (nodes are named module/op); per top-level module:"]
    for name, c in modules["top_level"].items():
        lines.append(
            f"  {name}: {c['nodes']} nodes, {c['int8']} INT8, {c['fp16']} FP16, {c['fp32']} FP32"
            + (f", {c['added']} added by precision passes" if c["added"] else "")
        )
    return lines


def _node_entry(value: Any) -> str:
    """``node (op): reason`` for the precision report's node records, the value itself otherwise."""
    if isinstance(value, dict) and "node" in value:
        return f"{value['node']} ({value.get('op', '?')}): {value.get('reason', '')}".rstrip(": ")
    return str(value)


def cmd_export_triton(args: argparse.Namespace) -> int:
    module_file = _check_module_file(args.module)
    version_dir = Path(args.repo) / args.name / str(args.version)
    if version_dir.exists() and not args.overwrite:
        raise ConfigError(
            f"{version_dir} already exists; pass --overwrite to replace it, or --version "
            f"{args.version + 1} to add a new version (Triton serves the highest version by default)"
        )
    module = trtopt.load(module_file, backend=args.backend, allow_host_code=args.allow_host_code)
    path = module.export_triton(  # trtopt.triton is imported there, only when used
        args.repo,
        args.name,
        version=args.version,
        max_batch_size=args.max_batch_size,
        dynamic_batching=not args.no_dynamic_batching,
        instances=args.instances,
        overwrite=args.overwrite,
        flavour=args.flavour,
    )
    logger.info("wrote Triton model %s", path)
    print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (exit 0) or until the server dies (exit 1)."""
    models: dict[str, Any] = {}
    if Path(args.module).is_dir():
        if args.models or args.name:
            raise ConfigError("a model repository directory is served as it is: drop NAME=PATH and --name")
        source: Any = Path(args.module)
    else:
        models[args.name or Path(args.module).stem] = _check_file(args.module, "module file")
        for pair in args.models:
            name, sep, path = pair.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"{pair!r}: give extra models as NAME=PATH, e.g. resnet=resnet.trtopt")
            if name in models:
                raise ConfigError(f"model name {name!r} is given twice; give each model its own name")
            models[name] = _check_file(path, "module file")
        source = models
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = serve(
            source,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.queue_delay_us,
            dynamic_batching=not args.no_dynamic_batching,
            instances=args.instances,
            block=False,
        )
        with server:
            urls = server.urls
            for name in server.models:
                print(f"serving {name} at {urls['http']} {urls['grpc']}", flush=True)
            if args.ready_file:
                ready = {
                    "models": server.models,
                    "host": server.host,
                    **{f"{what}_port": port for what, port in server.ports.items()},
                    "urls": urls,
                    "access_token": server.access_token,
                    "pid": os.getpid(),
                }
                atomic_write(args.ready_file, json.dumps(ready, indent=1), mode=0o600)  # holds the access token
            while not stop.wait(0.5) and server.alive():
                pass
            if not stop.is_set():
                raise ServeError(f"the Triton server stopped unexpectedly (exit code {server.wait()})")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------ parser


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas, e.g. 1,8,32")
    return values


def _alpha_or_off(text: str) -> float | str:
    """``--smoothquant``: SmoothQuant's alpha in (0, 1), or ``"off"``."""
    if text.lower() in ("off", "none", "0"):
        return "off"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: give SmoothQuant's alpha between 0 and 1 (e.g. 0.85), or 'off'")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trtopt",
        description="Compile PyTorch and ONNX models into fast TensorRT engines (ONNX Runtime on machines "
        "without a GPU), benchmark them, and inspect or serve the result.",
        epilog="Run `trtopt COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"trtopt {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug output on stderr")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in (_add_compile_command, _add_bench_command, _add_inspect_command, _add_export_triton_command,
                        _add_serve_command):
        add_command(subcommands.add_parser)
    return parser


# A subcommand's parser maker: ``add_subparsers().add_parser``.
AddParser = Callable[..., argparse.ArgumentParser]


def _add_backend_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=[b.value for b in Backend], default="auto",
                   help="auto: TensorRT where it and a GPU are available, else ONNX Runtime (default)")


def _add_host_code_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-host-code", action="store_true",
                   help="let a version-compatible engine in a .trtopt file run the native code it carries "
                        "(only for files you trust; otherwise it is rebuilt from the file's graph)")


def _add_shapes_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", action="append", default=[], metavar="NAME:MIN,OPT,MAX",
                   help="input shape range in trtexec's 1x3x224x224 notation; repeatable (see below)")


def _add_compile_command(add_parser: AddParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = add_parser("compile", help="compile an ONNX file or a PyTorch factory to a .trtopt file",
                   description="Compile a model into a .trtopt module file.\n\n" + SOURCE_HELP,
                   epilog=SHAPES_HELP + "\nexample:\n  trtopt compile model.onnx --precision int8 "
                   "--calib calib.npz --shapes x:1x3x224x224,8x3x224x224,32x3x224x224 -o model.trtopt",
                   formatter_class=raw)
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--precision", choices=[v.value for v in Precision], default="fp32")
    p.add_argument("--calib", metavar="DATA.npz",
                   help="calibration data for int8/fp8 (and the fp16 keep-list): a .npz with one array per input, "
                   "keyed by input name, each a stack of batches along axis 0")
    p.add_argument("--calibrator", choices=[v.value for v in CalibratorKind],
                   help="int8/fp8 range algorithm (default: "
                   + ", ".join(f"{k.value} for {p.value}" for p, k in DEFAULT_CALIBRATORS.items())
                   + "; see docs/calibration.md)")
    p.add_argument("--int8-layout", choices=list(INT8_LAYOUTS),
                   help="int8: 'tensorrt' (default: symmetric INT8, what TensorRT builds) or 'cpu' (uint8 activations "
                   "with zero points for ONNX Runtime's CPU integer kernels; runs on onnxruntime only)")
    p.add_argument("--smoothquant", type=_alpha_or_off, metavar="ALPHA|off",
                   help=f"int8/fp8: SmoothQuant's alpha for MatMul/Gemm layers (default {BuildConfig().smoothquant}), or off")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="fp16/int8: keep these out of reduced precision (FP32, not quantized): a glob on torch "
                   "module paths, e.g. 'encoder.layers.*.self_attn' (a module takes everything inside it), or on "
                   "ONNX node names; repeatable")
    p.add_argument("--exclude-op-types", action="append", default=[], metavar="OP",
                   help="fp16/int8: keep every node of this ONNX op type out of reduced precision, e.g. Softmax; "
                   "repeatable")
    p.add_argument("--calib-batches", type=_positive, metavar="N", help="use at most N calibration batches")
    p.add_argument("--calib-cache", metavar="PATH", help="TensorRT calibration cache to read, or write")
    p.add_argument("--accuracy-budget", metavar="METRIC>=BOUND",
                   help="int8/fp8: keep the fewest layers out of INT8/FP8 that meet this budget, e.g. 'cosine>=0.999', "
                   "'top1>=0.995', 'max_abs<=0.05' (judged on --validation, else on the last fifth of --calib)")
    p.add_argument("--validation", metavar="DATA.npz",
                   help="fp16/int8/fp8: data to measure the module against FP32 on, and to judge --accuracy-budget "
                   "(.npz, like --calib; default: the last fifth of --calib, held back from calibration)")
    p.add_argument("--best-effort", action="store_true",
                   help="with --accuracy-budget: return the closest module when the budget cannot be met")
    p.add_argument("--emit-onnx", metavar="OUT.onnx",
                   help="also write the final graph with its manifest, build script (trtexec) and (int8) "
                   "calibration cache, to build the engine on another machine")
    _add_shapes_option(p)
    _add_backend_option(p)
    p.add_argument("-o", "--output", metavar="OUT.trtopt", help="output file (default: SOURCE's name + .trtopt)")
    p.set_defaults(func=cmd_compile)


def _add_bench_command(add_parser: AddParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = add_parser("bench", help="measure latency, throughput, accuracy and memory",
                   description="Benchmark a saved .trtopt module, or a factory MODULE:FUNCTION returning "
                   "(model, example_inputs); a factory is compared with torch eager, side by side, and its "
                   "accuracy measured on the example inputs.\n"
                   "For several batch sizes dim 0 of every input is taken as the batch.",
                   formatter_class=raw)
    p.add_argument("source", metavar="SOURCE", help="a .trtopt file or MODULE:FUNCTION")
    p.add_argument("--batch-sizes", type=_int_list, metavar="B1,B2,...",
                   help="default: the profile's opt batch (module) or the example's batch (factory)")
    p.add_argument("--precision", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                   metavar="P1,P2", help="factory only: precisions to compile at, e.g. fp32,fp16,int8,fp8 (default "
                   "fp32); a module file runs at the precision it was compiled at")
    p.add_argument("--calib", metavar="DATA.npz", help="factory only: calibration data for fp16, int8 and fp8 (as for compile)")
    p.add_argument("--iterations", type=_positive, default=50, help="timed calls per batch size (default 50)")
    p.add_argument("--warmup", type=_positive, default=5, help="untimed calls per batch size (default 5)")
    p.add_argument("--threads", type=_positive, metavar="N",
                   help="intra-op CPU threads for every row alike: torch's and ONNX Runtime's (default: torch's "
                   "count, the physical cores)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': stdout)")
    _add_backend_option(p)
    _add_host_code_option(p)
    p.set_defaults(func=cmd_bench)


def _add_inspect_command(add_parser: AddParser) -> None:
    p = add_parser("inspect", help="show a .trtopt file's inputs, outputs, profiles and precision",
                   description="Show what a .trtopt file holds, without running it.")
    p.add_argument("module", metavar="MODULE.trtopt")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_inspect)


def _add_export_triton_command(add_parser: AddParser) -> None:
    p = add_parser("export-triton", help="write a Triton Inference Server model repository",
                   description="Write <REPO>/<NAME>/<VERSION>/model.plan (or model.onnx) and config.pbtxt "
                   "for NVIDIA Triton Inference Server.")
    p.add_argument("module", metavar="MODULE.trtopt")
    p.add_argument("repo", metavar="REPO", help="model repository directory (created if missing)")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--version", type=_positive, default=1, help="model version (default 1)")
    p.add_argument("--max-batch-size", type=int, metavar="N",
                   help="default: the profile's largest batch, or 0 when the batch dim is static")
    p.add_argument("--no-dynamic-batching", action="store_true", help="leave Triton's dynamic batcher off")
    p.add_argument("--instances", type=_positive, default=1, help="model instances per GPU (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version directory")
    p.add_argument("--flavour", choices=("native", "python"), default="native",
                   help="native: model.plan / model.onnx for full Triton containers (default); python: "
                   "model.trtopt run by trtopt in Triton's Python backend (what `trtopt serve` runs)")
    _add_backend_option(p)
    _add_host_code_option(p)
    p.set_defaults(func=cmd_export_triton)


def _add_serve_command(add_parser: AddParser) -> None:
    p = add_parser("serve", help="serve .trtopt files on NVIDIA Triton Inference Server (HTTP, gRPC, metrics)",
                   description="Serve one or more .trtopt files, or a model repository written by "
                   "export_triton(flavour='python'), on the Triton Inference Server bundled in NVIDIA PyTriton "
                   "(pip install \"trtopt[serve]\"). Prints one 'serving NAME at http://... grpc://...' line per "
                   "model when ready; SIGTERM or Ctrl-C stops it (exit code 0).")
    p.add_argument("module", metavar="MODULE.trtopt", help="a module file (or a model repository directory)")
    p.add_argument("models", nargs="*", metavar="NAME=PATH", help="more models to serve, each under its NAME")
    p.add_argument("--name", help="the first module's model name (default: its file name without .trtopt)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}, this machine only; 0.0.0.0 for all interfaces)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, default=8002,
                   help="Prometheus metrics port (default 8002; 0 picks a free one)")
    p.add_argument("--max-batch-size", type=int, metavar="N",
                   help="default: the profile's largest batch, or 0 when the batch dim is static")
    p.add_argument("--queue-delay-us", type=int, default=100, metavar="US",
                   help="how long the dynamic batcher may hold a request to batch it (default 100)")
    p.add_argument("--no-dynamic-batching", action="store_true", help="leave Triton's dynamic batcher off")
    p.add_argument("--instances", type=_positive, default=1, help="model copies serving in parallel (default 1)")
    p.add_argument("--ready-file", metavar="PATH",
                   help="write JSON with the ports, URLs and access token here once every model is ready")
    p.set_defaults(func=cmd_serve)


@contextlib.contextmanager
def _setup_logging(verbose: bool, quiet: bool) -> Iterator[None]:
    """trtopt's log lines on stderr while one command runs; the logger is left as it was found.

    ``main()`` is also called in-process (tests, notebooks, scripts): a handler left behind
    would hold that call's ``sys.stderr`` (pytest's capture closes it: "I/O operation on
    closed file" on the next log line) and repeat every later line of the host program.
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("trtopt")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbose else "trtopt: %(message)s"))
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trtopt`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0)
    try:
        with _setup_logging(args.verbose, args.quiet):
            return args.func(args)
    except TrtoptError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception held
        print(f"trtopt: error: {message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"trtopt: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("trtopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
