"""Calibrate here, build there: the final graph plus what the target needs to build it.

``export_onnx`` writes, next to ``<name>.onnx``:
- ``<name>.json``: a manifest (inputs/outputs, profiles, precision summary, versions),
- ``<name>.build.sh``: the trtexec (and Polygraphy) command lines that build the
  equivalent engine on the target — strongly typed and without precision flags,
  because the precision is already in the graph (valid on TensorRT 10 and 11),
  with the module's engine settings (version and hardware compatibility,
  optimization level, workspace, TF32 off unless ``tf32=True``),
- ``<name>.calib.cache``: the TensorRT calibration cache, for INT8 modules whose
  precision report carries calibrated ranges (for tools that read one).

FP8 modules get no calibration cache: TensorRT takes FP8 scales only from the
graph's Q/DQ nodes (there is no FP8 calibrator, and the cache format holds INT8
scales, amax / 127, for implicit INT8 builds, which TensorRT 11 removed). The
manifest's precision summary still lists each tensor's calibrated amax.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import atomic_write
from ._version import __version__
from .config import DEFAULT_PERCENTILE, CalibratorKind
from .profiles import ShapeProfile
from .graph import save_model
from .calibrators.cache import algorithm_name, write_cache

if TYPE_CHECKING:
    from .module import CompiledModule

logger = logging.getLogger(__name__)


def trtexec_shapes(profile: ShapeProfile, which: str) -> str:
    """trtexec's ``name:1x3x224x224,other:1x16`` notation for the inputs with a dynamic dim."""
    parts = []
    for r in profile.inputs:
        if r.dynamic or r.min != r.max:  # a dynamic dim fixed to one size still needs its shape
            parts.append(f"{r.name}:{'x'.join(str(d) for d in getattr(r, which))}")
    return ",".join(parts)


_HARDWARE_LEVELS = {  # BuildConfig.hardware_compatibility -> (trtexec, polygraphy) spelling
    "ampere_plus": ("ampere+", "ampere_plus"),
    "same_compute_capability": ("sameComputeCapability", "same_compute_capability"),
}


def trtexec_settings(build_config: Mapping[str, Any]) -> list[str]:
    """trtexec flags for the engine settings the module was built with (``spec.info["build_config"]``).

    trtexec enables TF32 unless told ``--noTF32``, while trtopt clears it unless ``tf32=True``.
    A setting the file does not record (written before it existed) keeps trtexec's default.
    """
    flags = []
    if build_config.get("version_compatible"):
        flags.append("--versionCompatible")
    level = _HARDWARE_LEVELS.get(build_config.get("hardware_compatibility", "none"))
    if level:
        flags.append(f"--hardwareCompatibilityLevel={level[0]}")
    if build_config.get("optimization_level") is not None:
        flags.append(f"--builderOptimizationLevel={int(build_config['optimization_level'])}")
    if build_config.get("workspace_bytes") is not None:
        flags.append(f"--memPoolSize=workspace:{int(build_config['workspace_bytes'])}B")
    if "tf32" in build_config and not build_config["tf32"]:
        flags.append("--noTF32")
    return flags


def polygraphy_settings(build_config: Mapping[str, Any]) -> list[str]:
    """The same settings in ``polygraphy convert``'s flags (Polygraphy leaves TF32 off unless ``--tf32``)."""
    flags = []
    if build_config.get("version_compatible"):
        flags.append("--version-compatible")
    level = _HARDWARE_LEVELS.get(build_config.get("hardware_compatibility", "none"))
    if level:
        flags += ["--hardware-compatibility-level", level[1]]
    if build_config.get("optimization_level") is not None:
        flags += ["--builder-optimization-level", str(int(build_config["optimization_level"]))]
    if build_config.get("workspace_bytes") is not None:
        flags += ["--pool-limit", f"workspace:{int(build_config['workspace_bytes'])}"]
    if build_config.get("tf32"):
        flags.append("--tf32")
    return flags


def trtexec_command(
    onnx_path: str, profiles: Sequence[ShapeProfile], engine_path: str, build_config: Mapping[str, Any] | None = None
) -> str:
    """The trtexec line that builds every optimization profile with the module's engine settings.

    With several profiles, each one's shape flags follow ``--profile=N``, the form
    trtexec reads as one profile per shape set (as in NVIDIA's TensorRT cookbook).
    ``--stronglyTyped`` is required on TensorRT 10 and a no-op on 11, where strong
    typing is always on; no --fp16/--int8 flags, which 11 removed.
    """
    args = ["trtexec", f"--onnx={onnx_path}", "--stronglyTyped", f"--saveEngine={engine_path}"]
    args += trtexec_settings(build_config or {})
    for index, profile in enumerate(profiles):
        if not trtexec_shapes(profile, "min"):
            continue
        if len(profiles) > 1:
            args.append(f"--profile={index}")
        for flag, which in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            args.append(f"{flag}={trtexec_shapes(profile, which)}")
    return " ".join(shlex.quote(a) for a in args)


def polygraphy_command(
    onnx_path: str, profiles: Sequence[ShapeProfile], engine_path: str, build_config: Mapping[str, Any] | None = None
) -> str:
    """The Polygraphy line: repeating the shape flags creates one profile per repetition."""
    args = ["polygraphy", "convert", onnx_path, "--convert-to", "trt", "--strongly-typed", "-o", engine_path]
    args += polygraphy_settings(build_config or {})
    for profile in profiles:
        for r in profile.inputs:
            if not r.dynamic and r.min == r.max:
                continue
            for flag, shape in (("--trt-min-shapes", r.min), ("--trt-opt-shapes", r.opt), ("--trt-max-shapes", r.max)):
                args += [flag, f"{r.name}:[{','.join(str(d) for d in shape)}]"]
    return " ".join(shlex.quote(a) for a in args)


def _versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "trtopt": __version__}
    for package in ("torch", "onnx", "onnxruntime", "onnx-graphsurgeon", "polygraphy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def manifest(module: CompiledModule, onnx_name: str) -> dict[str, Any]:
    spec = module.spec
    return {
        "format": "trtopt-onnx-export",
        "format_version": 1,
        "onnx": onnx_name,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.outputs],
        "profiles": [p.to_json() for p in spec.profiles],
        "precision": spec.precision,
        "precision_summary": spec.info.get("precision", {}),
        "exporter": spec.info.get("exporter"),
        "opset": spec.info.get("opset"),
        "versions": _versions(),
    }


def export_onnx(module: CompiledModule, path: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the final graph and its companions; return their paths by kind."""
    path = Path(path)
    if path.suffix != ".onnx":
        path = path.with_suffix(".onnx")
    written = {"onnx": save_model(module.onnx_model, path)}
    written["manifest"] = atomic_write(
        path.with_suffix(".json"), json.dumps(manifest(module, path.name), indent=2) + "\n"
    )
    engine = path.with_suffix(".plan").name
    profiles = module.spec.profiles
    build_config = module.spec.info.get("build_config", {})  # the engine settings compile recorded
    lines = [
        "#!/bin/sh",
        "# Build the TensorRT engine for this graph on the target GPU (TensorRT 10 or 11).",
        "# The precision is in the graph (Q/DQ, casts): no precision flags are needed.",
        "set -e",
        'cd "$(dirname "$0")"',
    ]
    if module.spec.precision == "fp8":
        lines.append("# FP8 (E4M3) Q/DQ: needs a GPU of compute capability 8.9+ (Ada, Hopper) and TensorRT 10+.")
    elif module.spec.precision == "int4":
        lines.append("# INT4 weight-only (W4A16, opset 21): needs a GPU of compute capability 8.0+ and TensorRT 10+.")
    elif module.spec.precision == "nvfp4":
        lines.append("# NVFP4 weights (opset 23): needs a Blackwell GPU (compute capability 10.0+) and TensorRT 10.8+.")
    if len(profiles) > 1:
        lines += [
            f"# The module has {len(profiles)} optimization profiles, in this order (--profile=N).",
            trtexec_command(path.name, profiles, engine, build_config),
            "# Or with Polygraphy (pip install polygraphy), which makes one profile per repetition:",
            "# " + polygraphy_command(path.name, profiles, engine, build_config),
        ]
    else:
        lines.append(trtexec_command(path.name, profiles, engine, build_config))
    written["build_script"] = atomic_write(path.with_suffix(".build.sh"), "\n".join(lines) + "\n")
    os.chmod(written["build_script"], 0o755)
    report = module.precision_report
    if report.activation_amax and module.spec.precision == "int8":  # FP8: see the module docstring
        scales = {name: amax / 127.0 for name, amax in report.activation_amax.items()}
        # A report that does not name its calibrator (written before reports did) was calibrated
        # with entropy, the default then. Only the percentile calibrator's header reads the
        # percentile, and its reports carry it; the default stands in for reports that do not.
        calibrator = report.calibrator or CalibratorKind.ENTROPY.value
        algorithm = algorithm_name(calibrator, report.percentile or DEFAULT_PERCENTILE)
        written["calibration_cache"] = write_cache(path.with_suffix(".calib.cache"), scales, algorithm)
    logger.info("exported %s", ", ".join(str(p) for p in written.values()))
    return written
