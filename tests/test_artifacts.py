"""export_onnx: the final graph and what the target needs to build the engine (issue 9)."""

from __future__ import annotations

import json
import shlex

import numpy as np
import onnxruntime as ort
import pytest
import torch

import trtopt
from tests._models import MaskedEncoder, padding_mask
from tests.helpers import flat


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    return trtopt.compile(
        MaskedEncoder().eval(),
        (torch.randn(2, 10, 32), padding_mask(2, 10)),
        dynamic_shapes={"tokens": {0: (1, 4, 8), 1: (2, 12, 24)}, "padding_mask": {0: (1, 4, 8), 1: (2, 12, 24)}},
        backend="onnxruntime",
    )


def test_exported_graph_runs_like_the_module(compiled, tmp_path):
    paths = compiled.export_onnx(tmp_path / "encoder.onnx")
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    tokens, mask = torch.randn(3, 7, 32), padding_mask(3, 7)
    (got,) = session.run(None, {"tokens": tokens.numpy(), "padding_mask": mask.numpy()})
    np.testing.assert_array_equal(got, compiled(tokens, mask).numpy())


def test_manifest_matches_the_module(compiled, tmp_path):
    paths = compiled.export_onnx(tmp_path / "encoder.onnx")
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["onnx"] == "encoder.onnx"
    assert [i["name"] for i in manifest["inputs"]] == compiled.input_names
    assert [i["dtype"] for i in manifest["inputs"]] == ["float32", "bool"]
    assert [o["name"] for o in manifest["outputs"]] == compiled.output_names
    assert manifest["profiles"] == [p.to_json() for p in compiled.profiles]
    assert manifest["precision"] == "fp32"
    assert manifest["versions"]["trtopt"] == trtopt.__version__ and "torch" in manifest["versions"]


def test_trtexec_line_names_every_dynamic_input(compiled, tmp_path):
    paths = compiled.export_onnx(tmp_path / "encoder.onnx")
    commands = [ln for ln in paths["build_script"].read_text().splitlines() if ln.startswith("trtexec")]
    assert len(commands) == 1
    args = dict(a.split("=", 1) for a in shlex.split(commands[0])[1:] if "=" in a)
    assert args["--onnx"] == "encoder.onnx"
    assert "--stronglyTyped" in commands[0]
    assert not any(flag in commands[0] for flag in ("--fp16", "--int8", "--best"))
    assert args["--minShapes"] == "tokens:1x2x32,padding_mask:1x2"
    assert args["--optShapes"] == "tokens:4x12x32,padding_mask:4x12"
    assert args["--maxShapes"] == "tokens:8x24x32,padding_mask:8x24"


def test_several_profiles_get_one_trtexec_line_with_every_profile(tmp_path):
    """Issue 15: trtexec builds several profiles when each shape set follows --profile=N."""
    model = torch.nn.Linear(4, 2).eval()
    compiled = trtopt.compile(
        model, (torch.randn(2, 4),), dynamic_shapes=[{"input": {0: (1, 2, 4)}}, {"input": {0: (5, 16, 32)}}]
    )
    script = compiled.export_onnx(tmp_path / "linear")["build_script"].read_text()
    (trtexec,) = [ln for ln in script.splitlines() if ln.startswith("trtexec")]
    flags = [a for a in shlex.split(trtexec)[1:] if a.startswith(("--profile", "--minShapes", "--optShapes", "--maxShapes"))]
    assert flags == [
        "--profile=0", "--minShapes=input:1x4", "--optShapes=input:2x4", "--maxShapes=input:4x4",
        "--profile=1", "--minShapes=input:5x4", "--optShapes=input:16x4", "--maxShapes=input:32x4",
    ]
    polygraphy = next(ln for ln in script.splitlines() if ln.startswith("# polygraphy"))  # the alternative
    assert polygraphy.count("--trt-min-shapes") == 2
    assert "input:[5,4]" in polygraphy and "input:[32,4]" in polygraphy


def test_the_exported_graph_compiles_again_on_the_target(compiled, tmp_path):
    paths = compiled.export_onnx(tmp_path / "encoder.onnx")
    spec = {"tokens": {0: (1, 4, 8), 1: (2, 12, 24)}, "padding_mask": {0: (1, 4, 8), 1: (2, 12, 24)}}
    target = trtopt.compile(paths["onnx"], dynamic_shapes=spec, backend="onnxruntime")
    tokens, mask = torch.randn(5, 20, 32), padding_mask(5, 20)
    for a, b in zip(flat(target(tokens, mask)), flat(compiled(tokens, mask))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def int8_cnn():
    from tests._models import ResidualCNN

    torch.manual_seed(0)
    model = ResidualCNN().eval()
    calibration = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    compiled = trtopt.compile(
        model, (torch.randn(2, 3, 16, 16),), precision="int8", calibration_data=calibration,
        dynamic_shapes={"x": {0: (1, 4, 8)}}, backend="onnxruntime",
    )
    return model, compiled


def test_int8_export_carries_qdq_and_a_calibration_cache(int8_cnn, tmp_path):
    from trtopt.calibrators import read_cache
    from trtopt.precision import validate_qdq

    _, compiled = int8_cnn
    paths = compiled.export_onnx(tmp_path / "cnn.onnx")
    import onnx

    assert validate_qdq(onnx.load(paths["onnx"])) == compiled.precision_report.qdq_nodes > 0
    cache = read_cache(paths["calibration_cache"])
    amax = compiled.precision_report.activation_amax
    assert cache.algorithm == "AutoCalibration" and set(cache.scales) == set(amax)  # the default calibrator
    for name, scale in cache.scales.items():
        assert scale == pytest.approx(amax[name] / 127, rel=1e-6)
    assert json.loads(paths["manifest"].read_text())["precision_summary"]["qdq_nodes"] > 0


def test_target_builds_the_int8_export_without_recalibrating(int8_cnn, tmp_path, caplog):
    _, compiled = int8_cnn
    paths = compiled.export_onnx(tmp_path / "cnn.onnx")
    with caplog.at_level("INFO", logger="trtopt"):
        target = trtopt.compile(paths["onnx"], precision="int8", dynamic_shapes={"x": {0: (1, 4, 8)}})
    assert target.precision == "int8" and target.precision_report.from_graph
    assert not any("calibrat" in r.getMessage().lower() for r in caplog.records if r.name.startswith("trtopt.calibrators"))
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(target(x), compiled(x), rtol=1e-5, atol=1e-5)


def test_a_quantized_graph_refuses_another_precision_or_a_budget(int8_cnn, tmp_path):
    _, compiled = int8_cnn
    paths = compiled.export_onnx(tmp_path / "cnn.onnx")
    spec = {"x": {0: (1, 4, 8)}}
    with pytest.raises(trtopt.ConfigError, match="already carries its precision \\(int8"):
        trtopt.compile(paths["onnx"], precision="fp16", dynamic_shapes=spec)
    with pytest.raises(trtopt.ConfigError, match="with an accuracy_budget"):
        trtopt.compile(paths["onnx"], precision="int8", dynamic_shapes=spec, accuracy_budget="cosine>=0.9")


def test_a_dynamic_dim_fixed_to_one_size_still_gets_its_shapes(compiled, tmp_path):
    fixed = {"tokens": {0: (4, 4, 4), 1: (12, 12, 12)}, "padding_mask": {0: (4, 4, 4), 1: (12, 12, 12)}}
    onnx_path = compiled.export_onnx(tmp_path / "encoder.onnx")["onnx"]
    again = trtopt.compile(onnx_path, dynamic_shapes=fixed, backend="onnxruntime")
    line = next(ln for ln in again.export_onnx(tmp_path / "again.onnx")["build_script"].read_text().splitlines()
                if ln.startswith("trtexec"))
    # The graph's dims stay symbolic; without shapes trtexec would build them at size 1.
    assert "--minShapes=tokens:4x12x32,padding_mask:4x12" in line and "--maxShapes=tokens:4x12x32" in line


def test_the_build_script_reproduces_the_engine_settings(compiled, tmp_path):
    """Issue 26 item 9: the script built a different engine (defaults, and trtexec's TF32 on)."""
    import dataclasses

    from trtopt import compiler
    from trtopt.config import BuildConfig
    from trtopt.module import CompiledModule

    settings = BuildConfig(version_compatible=True, hardware_compatibility="ampere_plus", optimization_level=5,
                           workspace_bytes=3 << 29)
    info = {**compiled.spec.info, "build_config": compiler._engine_config_json(settings)}
    module = CompiledModule(compiled.onnx_model, dataclasses.replace(compiled.spec, info=info), compiled.backend)
    script = module.export_onnx(tmp_path / "encoder.onnx")["build_script"].read_text()
    (line,) = [ln for ln in script.splitlines() if ln.startswith("trtexec")]
    args = shlex.split(line)
    for flag in ("--versionCompatible", "--hardwareCompatibilityLevel=ampere+", "--builderOptimizationLevel=5",
                 f"--memPoolSize=workspace:{3 << 29}B", "--noTF32"):
        assert flag in args, (flag, args)
    tf32 = compiler._engine_config_json(settings.replace(tf32=True, version_compatible=False))
    assert "--noTF32" not in trtexec_line(tf32) and "--versionCompatible" not in trtexec_line(tf32)


def trtexec_line(build_config):
    from trtopt.artifacts import trtexec_command

    return trtexec_command("m.onnx", [], "m.plan", build_config)
