"""INT4 weight-only (W4A16) and NVFP4 weights: the encoding, the graph TensorRT takes, its checks, the CPU backend."""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import trtopt
from trtopt.backends.tensorrt import build as builder
from trtopt.executor.lowbit_cpu import decode_fp4_weights
from trtopt.executor.session import make_session, run_graph
from trtopt.config import BuildConfig
from trtopt.profiles import InputRange, ShapeProfile
from trtopt.errors import ConfigError, DependencyError, GraphError
from trtopt.precision import validate_qdq
from trtopt.precision.int4 import nvfp4_decode, nvfp4_encode, rtn_int4, weight_units

from .trt_doubles import FakeCuda

BATCH = 8


def mlp(k: int = 256, hidden: int = 128, out: int = 64, seed: int = 0, outliers: bool = False) -> onnx.ModelProto:
    """x [8, k] -> LayerNorm -> MatMul [k, hidden] -> Relu -> MatMul [hidden, out] -> MatMul [out, 10].

    The last layer has 64 input channels (not a multiple of 128): INT4 leaves it in float.
    ``outliers``: a few LayerNorm output channels 30x larger, as in transformers (AWQ's case).
    """
    rng = np.random.default_rng(seed)
    gamma = np.ones(k, np.float32)
    if outliers:
        gamma[rng.choice(k, 6, replace=False)] = 30.0
    inits = [
        numpy_helper.from_array(gamma, "ln_scale"),
        numpy_helper.from_array(np.zeros(k, np.float32), "ln_bias"),
        numpy_helper.from_array((rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((hidden, out)) / np.sqrt(hidden)).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal((out, 10)) / np.sqrt(out)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["h0"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
        helper.make_node("MatMul", ["h3", "w3"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 10])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def batches(k: int = 256, count: int = 10, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((BATCH, k)).astype(np.float32)} for _ in range(count)]


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute}


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# ------------------------------------------------------------------ encoding


def reference_rtn(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """INT4 RTN written from the spec, one block at a time: s = max|w| / 7 (floor 1e-5) in the weight's
    type, q = round half to even of w / s (in the weight's type), clipped to [-8, 7]."""
    k, n = w.shape
    codes = np.zeros((k, n), np.int8)
    scales = np.zeros((k // block, n), w.dtype)
    for b in range(k // block):
        for j in range(n):
            column = w[b * block : (b + 1) * block, j]
            s = w.dtype.type(max(float(np.abs(column.astype(np.float32)).max()) / 7.0, 1e-5))
            scales[b, j] = s
            for i, value in enumerate(column):
                codes[b * block + i, j] = min(7, max(-8, round(float(w.dtype.type(value / s)))))  # round(): half to even
    return codes, scales


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rtn_codes_and_scales_match_the_spec(dtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((128, 6)) * 0.05).astype(dtype)
    w[:64, 0] = np.array([7.0, 2.5, -2.5, 3.5, 0.5, -0.5] + [0.0] * 58, dtype)  # ties: 2.5 -> 2, 3.5 -> 4, 0.5 -> 0
    w[:, 1] = 0  # an all-zero block keeps a positive scale
    codes, scales = rtn_int4(w, 64)
    expected_codes, expected_scales = reference_rtn(w, 64)
    assert scales.dtype == dtype and scales.shape == (2, 6)
    np.testing.assert_array_equal(scales, expected_scales)
    np.testing.assert_array_equal(codes, expected_codes)
    assert codes[:6, 0].tolist() == [7, 2, -2, 4, 0, 0]
    assert np.all(scales > 0)


def test_rtn_blocks_along_the_given_axis():
    w = np.random.default_rng(1).standard_normal((6, 128)).astype(np.float32)  # a Gemm's [N, K]
    codes, scales = rtn_int4(w, 64, axis=1)
    expected_codes, expected_scales = reference_rtn(w.T.copy(), 64)
    np.testing.assert_array_equal(codes, expected_codes.T)
    np.testing.assert_array_equal(scales, expected_scales.T)


def test_nvfp4_round_trips_representable_weights_exactly():
    rng = np.random.default_rng(2)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    values = grid[rng.integers(0, 8, (4, 64))] * rng.choice([-1, 1], (4, 64))
    values[:, ::16] = 6.0  # every block reaches FP4's largest value, so its scale is exact
    block_scales = 2.0 ** rng.integers(-3, 3, (4, 4))  # FP8-representable
    weight = (values * np.repeat(block_scales, 16, axis=1) * (4.0 / (6 * 448))).astype(np.float32)
    codes, block_fp8, global_scale = nvfp4_encode(weight)
    assert codes.dtype == ml_dtypes.float4_e2m1fn and block_fp8.dtype == ml_dtypes.float8_e4m3fn
    assert block_fp8.shape == (4, 4) and global_scale.dtype == np.float32
    np.testing.assert_allclose(nvfp4_decode(codes, block_fp8, global_scale), weight, rtol=1e-6)


# ------------------------------------------------------------------ the graph


@pytest.fixture(scope="module")
def int4_module():
    return trtopt.compile(mlp(), precision="int4", backend="onnxruntime", calibration_data=batches())


def test_int4_graph_is_what_tensorrt_takes(int4_module):
    graph, report = int4_module.onnx_model, int4_module.precision_report
    assert opset(graph) >= 21 and report.precision == "int4"
    for layer, (k, n) in {"fc1": (256, 128), "fc2": (128, 64)}.items():
        node = next(x for x in graph.graph.node if x.name == layer)
        dq = producer(graph, node.input[1])
        assert dq.op_type == "DequantizeLinear" and len(dq.input) == 2  # no zero point
        assert attrs(dq) == {"axis": 0, "block_size": 128}
        codes, scale = initializer(graph, dq.input[0]), initializer(graph, dq.input[1])
        assert codes.data_type == TensorProto.INT4 and list(codes.dims) == [k, n]
        assert scale.data_type == TensorProto.FLOAT16 and list(scale.dims) == [k // 128, n]  # FP16 activations
        x_type = next(v for v in graph.graph.value_info if v.name == node.input[0]).type.tensor_type.elem_type
        assert x_type == TensorProto.FLOAT16
    assert validate_qdq(graph) == 2
    head = [k for k in report.not_quantized if k["node"] == "head"]
    assert head and "64 input channels are not a multiple of the block size 128" in head[0]["reason"]
    assert report.weight_only["weight_bytes_ratio"] <= 0.3
    assert {u["node"] for u in report.quantized_units} == {"fc1", "fc2"}


def test_int4_module_computes_with_the_dequantized_weights(int4_module):
    """The executor (TensorRT's numbers) against numpy: FP16 activations times the dequantized weights."""
    graph = int4_module.onnx_model
    x = batches(count=1, seed=5)[0]["x"]
    weights = {}
    for layer in ("fc1", "fc2"):
        dq = producer(graph, next(n for n in graph.graph.node if n.name == layer).input[1])
        codes = numpy_helper.to_array(initializer(graph, dq.input[0])).astype(np.float32)
        scale = numpy_helper.to_array(initializer(graph, dq.input[1])).astype(np.float32)
        weights[layer] = codes * np.repeat(scale, 128, axis=0)
    source = mlp()
    w3 = numpy_helper.to_array(initializer(source, "w3"))
    mean, std = x.mean(-1, keepdims=True), x.std(-1, keepdims=True)
    h = (x - mean) / np.sqrt(std**2 + 1e-5)
    expected = np.maximum(h @ weights["fc1"], 0) @ weights["fc2"] @ w3
    got = run_graph(graph, [{"x": x}])[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.02 * np.abs(expected).max())
    fp32 = run_graph(source, [{"x": x}])[0]
    assert np.abs(got - fp32).max() > 10 * np.abs(got - expected).max()  # INT4's error, not the float noise


def test_executor_folds_int4_and_the_backend_fuses_matmulnbits(int4_module, tmp_path):
    from trtopt.executor.fp16_emulation import emulate_fp16

    emulated = emulate_fp16(int4_module.onnx_model)
    ops = {}
    for level in (None, 4):
        path = tmp_path / f"level_{level}.onnx"
        make_session(emulated, optimized_model_path=str(path), int4_accuracy_level=level)
        ops[level] = {n.op_type for n in onnx.load(path).graph.node}
    assert "MatMulNBits" not in ops[None] and "DequantizeLinear" not in ops[None]  # folded into FP32 weights
    assert "MatMulNBits" in ops[4]
    x = batches(count=1, seed=6)[0]["x"]
    exact = run_graph(int4_module.onnx_model, [{"x": x}])[0]
    fp32_level = trtopt.compile(mlp(), precision="int4", backend="onnxruntime", int4_cpu_accuracy_level=1)
    np.testing.assert_allclose(fp32_level(x), exact, rtol=1e-3, atol=1e-3 * np.abs(exact).max())


def test_bench_threads_keep_int4_on_matmulnbits():
    # `trtopt bench` gives each ONNX Runtime module a session with the benchmark's thread count; an INT4
    # module must keep its MatMulNBits accuracy level there, else it is timed as FP32 weights.
    from trtopt.bench.candidates import _pin_threads, compiled_candidate

    module = trtopt.compile(mlp(), precision="int4", backend="onnxruntime", int4_cpu_accuracy_level=2)
    _pin_threads(compiled_candidate("int4", module), 1)
    options = module.backend.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "2"


def test_save_and_load_keep_int4(int4_module, tmp_path):
    path = tmp_path / "m.trtopt"
    int4_module.save(path)
    loaded = trtopt.load(path)
    x = batches(count=1, seed=7)[0]["x"]
    assert loaded.spec.precision == "int4"
    np.testing.assert_array_equal(loaded(x), int4_module(x))
    again = trtopt.compile(loaded.onnx_model, backend="onnxruntime")  # a graph that carries its precision
    assert again.precision_report.precision == "int4" and again.precision_report.from_graph


def test_weight_units_say_why_a_layer_stays_float():
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((100, 32)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.standard_normal((32, 128)).astype(np.float32), "w_k"),  # K = 32
        numpy_helper.from_array(rng.standard_normal((128, 7)).astype(np.float32), "w_odd"),  # N = 7
        numpy_helper.from_array(rng.standard_normal((128, 128)).astype(np.float32), "w_head"),
        numpy_helper.from_array(rng.standard_normal((128, 128)).astype(np.float32), "w_ok"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w_k"], ["a"], name="narrow"),
        helper.make_node("MatMul", ["a", "w_ok"], ["b"], name="ok"),
        helper.make_node("MatMul", ["b", "w_odd"], ["c"], name="odd"),
        helper.make_node("MatMul", ["b", "w_head"], ["d"], name="lm_head"),
        helper.make_node("MatMul", ["a", "b"], ["f"], name="product"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "d")], inits,
    )
    units, skipped = weight_units(helper.make_model(graph), block_size=64, exclude_nodes=["lm_head"])
    assert [u.node for u in units] == ["ok"]
    reasons = {k.name: k.reason for k in skipped}
    assert "embedding" in reasons["embed"]
    assert "32 input channels are not a multiple of the block size 64" in reasons["narrow"]
    assert "last dim (7) is odd" in reasons["odd"]
    assert "lm_head" in reasons["lm_head"]
    assert "not a constant" in reasons["product"]


# ------------------------------------------------------------------ TensorRT's rules


def _mutated(model: onnx.ModelProto, change) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    change(copy)
    return copy


def _first_dq(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "weight_DequantizeLinear" in n.name)


def _set_block(model, size):
    dq = _first_dq(model)
    codes = numpy_helper.to_array(initializer(model, dq.input[0])).astype(np.int8)
    scale = numpy_helper.to_array(initializer(model, dq.input[1]))
    new = np.repeat(scale, 128 // size, axis=0)
    initializer(model, dq.input[1]).CopyFrom(numpy_helper.from_array(new, dq.input[1]))
    next(a for a in dq.attribute if a.name == "block_size").i = size
    assert codes.shape[0] % size == 0


def _add_zero_point(model, value):
    dq = _first_dq(model)
    scale = initializer(model, dq.input[1])
    zp = np.full(tuple(scale.dims), value, np.int8).astype(ml_dtypes.int4)
    model.graph.initializer.append(numpy_helper.from_array(zp, "zp"))
    dq.input.append("zp")


def _flatten_scale(model):
    dq = _first_dq(model)
    scale = numpy_helper.to_array(initializer(model, dq.input[1]))
    initializer(model, dq.input[1]).CopyFrom(numpy_helper.from_array(scale.reshape(-1), dq.input[1]))


def _opset(model, version):
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = version


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: _set_block(m, 32), "block_size=32"),
        (lambda m: _add_zero_point(m, 1), "zero point 'zp' is not 0"),
        (_flatten_scale, "scale of rank 1 for a weight of rank 2"),
        (lambda m: _opset(m, 19), "needs opset 21"),
    ],
    ids=["block-32", "zero-point", "scale-rank", "opset-19"],
)
def test_validate_qdq_refuses_what_tensorrt_refuses(int4_module, change, message):
    with pytest.raises(GraphError, match=message):
        validate_qdq(_mutated(int4_module.onnx_model, change))


def test_validate_qdq_takes_a_zero_zero_point(int4_module):
    assert validate_qdq(_mutated(int4_module.onnx_model, lambda m: _add_zero_point(m, 0))) == 2


# ------------------------------------------------------------------ NVFP4


@pytest.fixture(scope="module")
def nvfp4_module():
    return trtopt.compile(mlp(), precision="nvfp4", backend="onnxruntime", calibration_data=batches())


def test_nvfp4_graph_is_the_pattern_tensorrt_takes(nvfp4_module):
    graph = nvfp4_module.onnx_model
    assert opset(graph) >= 23 and nvfp4_module.precision_report.precision == "nvfp4"
    for layer, (k, n) in {"fc1": (256, 128), "fc2": (128, 64), "head": (64, 10)}.items():
        node = next(x for x in graph.graph.node if x.name == layer)
        cast = producer(graph, node.input[1])
        transpose = producer(graph, cast.input[0])
        dq = producer(graph, transpose.input[0])
        scale_dq = producer(graph, dq.input[1])
        assert (cast.op_type, attrs(cast)["to"]) == ("Cast", TensorProto.FLOAT16)
        assert transpose.op_type == "Transpose" and list(transpose.attribute[0].ints) == [1, 0]
        assert dq.op_type == "DequantizeLinear" and attrs(dq) == {"axis": -1, "block_size": 16}
        codes = initializer(graph, dq.input[0])
        assert codes.data_type == TensorProto.FLOAT4E2M1 and list(codes.dims) == [n, k]  # [N, K]
        block, per_tensor = initializer(graph, scale_dq.input[0]), initializer(graph, scale_dq.input[1])
        assert block.data_type == TensorProto.FLOAT8E4M3FN and list(block.dims) == [n, k // 16]
        assert per_tensor.data_type == TensorProto.FLOAT and list(per_tensor.dims) == []
    assert validate_qdq(graph) == 6


def test_nvfp4_is_emulated_with_the_decoded_weights(nvfp4_module):
    graph = nvfp4_module.onnx_model
    decoded = decode_fp4_weights(graph)
    assert not any(t.data_type == TensorProto.FLOAT4E2M1 for t in decoded.graph.initializer)
    node = next(x for x in graph.graph.node if x.name == "fc1")
    dq = producer(graph, producer(graph, producer(graph, node.input[1]).input[0]).input[0])
    scale_dq = producer(graph, dq.input[1])
    expected = nvfp4_decode(
        numpy_helper.to_array(initializer(graph, dq.input[0])),
        numpy_helper.to_array(initializer(graph, scale_dq.input[0])),
        numpy_helper.to_array(initializer(graph, scale_dq.input[1])),
    )
    np.testing.assert_array_equal(numpy_helper.to_array(initializer(decoded, dq.output[0])), expected)
    w1 = numpy_helper.to_array(initializer(mlp(), "w1"))
    assert np.abs(expected.T - w1).max() <= np.abs(w1).max() / 6  # within half of FP4's widest step
    x = batches(count=1, seed=8)[0]["x"]
    fp32 = run_graph(mlp(), [{"x": x}])[0]
    cosine = (nvfp4_module(x) * fp32).sum(-1) / np.linalg.norm(nvfp4_module(x), axis=-1) / np.linalg.norm(fp32, axis=-1)
    assert cosine.min() > 0.95 and cosine.mean() > 0.98


# ------------------------------------------------------------------ settings, AWQ, readout


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="int4_block_size=32.*64 or 128"):
        BuildConfig(precision="int4", int4_block_size=32)
    with pytest.raises(ConfigError, match="int4_method='gptq'"):
        BuildConfig(precision="int4", int4_method="gptq")
    with pytest.raises(ConfigError, match="int4_cpu_accuracy_level=0"):
        BuildConfig(int4_cpu_accuracy_level=0)
    with pytest.raises(ConfigError, match="pass calibration_data"):
        trtopt.compile(mlp(), precision="int4", int4_method="awq", backend="onnxruntime")
    with pytest.raises(ConfigError, match="applies to precision='int4'"):
        trtopt.compile(mlp(), precision="nvfp4", int4_method="awq", backend="onnxruntime", calibration_data=batches())


def test_awq_beats_rtn_where_activations_have_outlier_channels():
    source = mlp(outliers=True)
    held = batches(count=4, seed=9)
    fp32 = run_graph(source, held)[0]
    errors, modules = {}, {}
    for method in ("rtn", "awq"):
        modules[method] = trtopt.compile(
            source, precision="int4", int4_method=method, backend="onnxruntime", calibration_data=batches(),
        )
        errors[method] = float(np.mean((run_graph(modules[method].onnx_model, held)[0] - fp32) ** 2))
    assert errors["awq"] < 0.9 * errors["rtn"], errors
    awq = modules["awq"].precision_report.weight_only["awq"]
    fc1 = next(r for r in awq if r["units"] == ["fc1"])
    assert fc1["alpha"] > 0 and fc1["folded_into"] == "ln"  # 1/s went into the LayerNorm in front


def int4_hostile_mlp() -> onnx.ModelProto:
    """``mlp()`` whose first layer INT4 ruins and the others it barely touches."""
    source = mlp()
    w1 = initializer(source, "w1")
    values = numpy_helper.to_array(w1).copy()
    values[::128] = 40.0  # one huge weight per block: the rest of each block rounds to 0 ...
    w1.CopyFrom(numpy_helper.from_array(values, "w1"))
    gamma = initializer(source, "ln_scale")
    dead = numpy_helper.to_array(gamma).copy()
    dead[::128] = 0.0  # ... while in FP32 it multiplies a channel the LayerNorm zeroes
    gamma.CopyFrom(numpy_helper.from_array(dead, "ln_scale"))
    return source


def test_readout_warns_that_int4_suits_weight_bound_models(caplog):
    source = int4_hostile_mlp()
    with caplog.at_level(logging.WARNING, logger="trtopt"):
        module = trtopt.compile(source, precision="int4", backend="onnxruntime", calibration_data=batches())
    assert module.precision_report.accuracy.cosine < 0.99
    assert any("weight-bound" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


# ------------------------------------------------------------------ GPU capability and the build script


def _profile() -> ShapeProfile:
    return ShapeProfile((InputRange("x", (BATCH, 256), (BATCH, 256), (BATCH, 256), ()),))


@pytest.mark.parametrize("fmt, too_old, enough", [("int4", (7, 5), (8, 0)), ("nvfp4", (9, 0), (10, 0))])
def test_builder_checks_the_compute_capability(fake_trt, int4_module, nvfp4_module, fmt, too_old, enough):
    graph = (int4_module if fmt == "int4" else nvfp4_module).onnx_model
    FakeCuda.compute_capability = too_old
    with pytest.raises(DependencyError, match=f"precision='{fmt}' needs a GPU of compute capability"):
        builder.build_engine(graph, [_profile()], BuildConfig())
    assert fake_trt.builds == 0
    FakeCuda.compute_capability = enough
    assert builder.build_engine(graph, [_profile()], BuildConfig()).startswith(b"FAKE-ENGINE")


def test_export_writes_the_int4_build_script(int4_module, tmp_path):
    written = int4_module.export_onnx(tmp_path / "m.onnx")
    script = written["build_script"].read_text()
    assert "INT4 weight-only" in script and "trtexec" in script
    assert onnx.load(written["onnx"]).graph.initializer  # the graph as built, INT4 weights included


def test_triton_repository_carries_int4_and_refuses_nvfp4_without_an_engine(int4_module, nvfp4_module, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="Triton export needs tritonclient (trtopt[triton])")
    model_dir = int4_module.export_triton(tmp_path, "w4a16")
    assert 'platform: "onnxruntime_onnx"' in (model_dir / "config.pbtxt").read_text()
    served = onnx.load(model_dir / "1" / "model.onnx")
    assert any(t.data_type == TensorProto.INT4 for t in served.graph.initializer)
    x = batches(count=1, seed=10)[0]["x"]
    np.testing.assert_allclose(  # ONNX Runtime as Triton runs it: the FP16 graph as written, MatMulNBits fused
        make_session(served, int4_accuracy_level=4).run(None, {"x": x})[0], run_graph(int4_module.onnx_model, [{"x": x}])[0],
        rtol=0.05, atol=0.05 * np.abs(int4_module(x)).max(),
    )
    with pytest.raises(ConfigError, match="NVFP4 module without a TensorRT engine"):
        nvfp4_module.export_triton(tmp_path, "nvfp4")


def test_accuracy_budget_keeps_the_layers_int4_hurts_in_fp16():
    module = trtopt.compile(
        int4_hostile_mlp(), precision="int4", backend="onnxruntime", calibration_data=batches(),
        accuracy_budget="cosine>=0.99",
    )
    report = module.precision_report
    assert report.accuracy_budget.met and report.accuracy_budget.kept_high == ["fc1"]
    assert report.accuracy.cosine >= 0.99
    assert {u["node"] for u in report.quantized_units} == {"fc2"}
    kept = next(k for k in report.not_quantized if k["node"] == "fc1")
    assert kept["reason"] == "kept FP16 by the accuracy budget"
    fc1 = next(n for n in module.onnx_model.graph.node if n.name == "fc1")
    assert initializer(module.onnx_model, fc1.input[1]).data_type == TensorProto.FLOAT16


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_inspect_counts_4_bit_weights_at_half_a_byte(precision, tmp_path):
    from trtopt.cli import describe_module

    module = trtopt.compile(mlp(), precision=precision, backend="onnxruntime")
    module.save(tmp_path / "m.trtopt")
    weights = describe_module(str(tmp_path / "m.trtopt"))["graph"]["weight_bytes_by_dtype"]
    four_bit = {"int4": "int4", "nvfp4": "float4_e2m1fn"}[precision]
    codes = sum(int(np.prod(t.dims)) for t in module.onnx_model.graph.initializer
                if t.data_type in (TensorProto.INT4, TensorProto.FLOAT4E2M1))
    # fc1 and fc2; the head's 64 input channels are a multiple of NVFP4's block 16, not of INT4's 128
    assert codes == 256 * 128 + 128 * 64 + (64 * 10 if precision == "nvfp4" else 0)
    assert weights[four_bit] == codes // 2
    if precision == "nvfp4":  # its block scales: one FP8 byte per 16 codes, and an FP32 scale per layer
        assert weights["float8_e4m3fn"] == codes // 16 and weights["float32"] >= 2 * 4


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_accuracy_budget_failure_names_the_weight_only_precision(precision):
    # An error of 0 is out of reach even with every layer FP16 (the float part rounds to FP16).
    with pytest.raises(trtopt.AccuracyBudgetError, match=f"^{precision.upper()} cannot meet the accuracy budget"):
        trtopt.compile(int4_hostile_mlp(), precision=precision, backend="onnxruntime", calibration_data=batches(),
                       accuracy_budget="max_abs<=0")


def test_awq_scales_that_hurt_the_module_are_dropped_for_rtn(monkeypatch, caplog):
    from trtopt.precision import int4

    def harmful(x, weights, block_size, grid=20):  # stands in for a search that generalises badly
        s = np.where(np.arange(x.shape[1]) % 2, 30.0, 1 / 30.0).astype(np.float32)
        return s, 0.5, 0.0, 1.0

    monkeypatch.setattr(int4, "awq_search", harmful)
    with caplog.at_level(logging.WARNING, logger="trtopt"):
        module = trtopt.compile(mlp(), precision="int4", int4_method="awq", backend="onnxruntime",
                                calibration_data=batches())
    weight_only = module.precision_report.weight_only
    assert weight_only["method"] == "rtn" and "AWQ's scales were dropped" in weight_only["note"]
    rtn = trtopt.compile(mlp(), precision="int4", backend="onnxruntime", calibration_data=batches())
    x = batches(count=1, seed=11)[0]["x"]
    np.testing.assert_array_equal(module(x), rtn(x))


def test_awq_search_never_trades_rtns_worst_row_for_a_better_mean():
    # Outlier channels (AWQ's case) and a few tokens without them: on seed 0 the scale that
    # minimises the mean error alone (alpha 0.25) makes one of those tokens worse than RTN.
    from trtopt.precision import int4

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 128)).astype(np.float32)
    x[:, :4] *= 20
    x[:3] = rng.normal(size=(3, 128)) * 3
    w = rng.normal(size=(128, 64)).astype(np.float32)

    def row_errors(s: np.ndarray) -> np.ndarray:
        codes, scale = int4.rtn_int4((w * s[:, None]).astype(np.float32), 128)
        reference = x @ w
        output = (x / s) @ int4.dequantize_int4(codes, scale, 128)
        return np.mean((output - reference) ** 2, axis=1) / (np.sum(reference**2, axis=1) + 1e-12)

    s, alpha, error, rtn_error = int4.awq_search(x, [w], 128)
    awq, rtn = row_errors(s), row_errors(np.ones(128, np.float32))
    assert alpha > 0 and error < rtn_error  # AWQ still helps on average here ...
    assert awq.mean() < rtn.mean() and awq.max() <= rtn.max()  # ... and no token pays for it


def masked_encoder(mask_name: str = "attention_mask") -> onnx.ModelProto:
    """x [2, 8, 128] and a padding mask [2, 8] -> LayerNorm -> MatMul [128, 64] -> x * mask (a masked encoder)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.ones(128, np.float32), "ln_scale"),
        numpy_helper.from_array(np.zeros(128, np.float32), "ln_bias"),
        numpy_helper.from_array((rng.standard_normal((128, 64)) / np.sqrt(128)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["h0"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h0", "w"], ["h1"], name="fc"),
        helper.make_node("Cast", [mask_name], ["m"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "last"], ["m3"], name="unsqueeze"),
        helper.make_node("Mul", ["h1", "m3"], ["y"], name="masked"),
    ]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 128]),
         helper.make_tensor_value_info(mask_name, TensorProto.INT64, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 64])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


PADDING_ROW = np.linspace(-50, 50, 128, dtype=np.float32)  # every padding position holds this (outlier) token


def padding_rows(rows: np.ndarray) -> int:
    """How many of the LayerNorm output rows AWQ searched on are the padding token's."""
    padding = (PADDING_ROW - PADDING_ROW.mean()) / np.sqrt(PADDING_ROW.var() + 1e-5)
    return int((np.abs(rows - padding).max(axis=1) < 1e-3).sum())


def masked_batches(mask_name: str = "attention_mask", count: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    out = []
    for _ in range(count):
        x = rng.standard_normal((2, 8, 128)).astype(np.float32)
        mask = np.zeros((2, 8), np.int64)
        mask[0, :5], mask[1, :3] = 1, 1  # right padding: 8 real tokens of 16
        x[mask == 0] = PADDING_ROW
        out.append({"x": x, mask_name: mask})
    return out


def test_awq_searches_on_real_tokens_only_when_the_graph_has_a_padding_mask(monkeypatch):
    from trtopt.precision import int4

    seen = []
    search = int4.awq_search

    def spy(x, weights, block_size, grid=20):
        seen.append(x)
        return search(x, weights, block_size, grid)

    monkeypatch.setattr(int4, "awq_search", spy)
    module = trtopt.compile(masked_encoder(), precision="int4", int4_method="awq", backend="onnxruntime",
                            calibration_data=masked_batches())
    (rows,) = seen
    # 8 real tokens of 16 per calibration batch (the pipeline holds some batches back for its readout)
    assert len(rows) % 8 == 0 and padding_rows(rows) == 0
    (record,) = module.precision_report.weight_only["awq"]
    assert record["rows"] == "rows at attention_mask=1 (padding positions left out)"


def test_awq_uses_every_row_without_a_0_1_padding_mask(monkeypatch):
    from trtopt.precision import int4

    seen = []
    search = int4.awq_search
    monkeypatch.setattr(int4, "awq_search", lambda x, *a, **k: seen.append(x) or search(x, *a, **k))
    # Named like a mask but not 0/1 (a position index, say): not a padding mask.
    data = masked_batches()
    for feeds in data:
        feeds["attention_mask"] = feeds["attention_mask"] * 2
    module = trtopt.compile(masked_encoder(), precision="int4", int4_method="awq", backend="onnxruntime",
                            calibration_data=data)
    assert 2 * padding_rows(seen[-1]) == len(seen[-1])
    rows = module.precision_report.weight_only["awq"][0]["rows"]
    assert rows == "all rows: input 'attention_mask' is not a 0/1 [batch, seq] mask with a 1 in every sample"
    # A 0/1 [batch, seq] input not named as a mask (BERT's token_type_ids): all rows as well.
    seen.clear()
    trtopt.compile(masked_encoder("token_type_ids"), precision="int4", int4_method="awq", backend="onnxruntime",
                   calibration_data=masked_batches("token_type_ids"))
    assert 2 * padding_rows(seen[-1]) == len(seen[-1])
    # torch's key_padding_mask is 1 (True) at padding: not a mask of real tokens.
    seen.clear()
    module = trtopt.compile(masked_encoder("key_padding_mask"), precision="int4", int4_method="awq",
                            backend="onnxruntime", calibration_data=masked_batches("key_padding_mask"))
    assert 2 * padding_rows(seen[-1]) == len(seen[-1])
    assert module.precision_report.weight_only["awq"][0]["rows"].startswith("all rows: no graph input named *mask*")


def test_row_sampler_takes_all_rows_of_a_tensor_the_mask_does_not_line_up_with():
    from trtopt.precision.int4 import PaddingMask, RowSampler

    mask = PaddingMask()
    mask.update(np.array([[1, 1, 0, 0]]))
    aligned, flat = RowSampler(mask=mask), RowSampler(mask=mask)
    aligned.update(np.arange(4 * 3, dtype=np.float32).reshape(1, 4, 3))
    flat.update(np.arange(4 * 3, dtype=np.float32).reshape(4, 3))  # [batch * seq, channels]: no alignment
    assert aligned.masked and sorted(aligned.values[:, 0]) == [0, 3]
    assert not flat.masked and len(flat.values) == 4
