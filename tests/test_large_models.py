"""Models over protobuf's 2 GB limit, pinned on a small model: ``EXTERNAL_DATA_THRESHOLD`` is lowered
so that a 0.3 MB MLP takes the path of a multi-GB one (weights on disk from export to the module,
streamed into and out of module files, external data in every file trtopt writes).

``benchmarks/large_models.py`` runs the same path at 0.5 to 4+ GiB and measures its memory.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import trtopt
from trtopt import graph
from trtopt.executor import session as executor_session
from trtopt.module import ONNX_DATA_MEMBER, read_module_file

WIDTH = 256


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 10_000)  # bytes: the MLP's 0.3 MB is "large"


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 8)
    ).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def external_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


@pytest.fixture
def compiled(small_threshold):
    model = mlp()
    x = torch.randn(3, WIDTH)
    module = trtopt.compile(model, (x,), backend="onnxruntime", dynamic_shapes={"input": {0: (1, 4, 8)}})
    return model, module, x


def test_weights_stay_on_disk_from_export_to_the_module(compiled):
    model, module, x = compiled
    directory = graph.weights_dir(module.onnx_model)
    assert directory is not None and directory.is_dir()
    # Every weight matrix lives in the file, not in the proto the passes handled.
    assert {"0.weight", "2.weight", "4.weight"} <= {t.name for t in external_initializers(module.onnx_model)}
    assert module.onnx_model.ByteSize() < weight_bytes(model) // 20
    np.testing.assert_allclose(module(x).numpy(), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_the_weights_directory_goes_with_the_module(small_threshold):
    module = trtopt.compile(mlp(), (torch.randn(2, WIDTH),), backend="onnxruntime")
    directory = graph.weights_dir(module.onnx_model)
    del module
    gc.collect()
    assert not directory.exists()


def test_save_streams_external_data_and_load_reads_it_back(compiled, tmp_path):
    model, module, x = compiled
    path = module.save(tmp_path / "m.trtopt")
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        assert manifest["format_version"] == 2  # the version that has the external-data member
        assert set(manifest["sha256"]) == {"model.onnx", ONNX_DATA_MEMBER}
        assert archive.getinfo(ONNX_DATA_MEMBER).file_size >= weight_bytes(model)
        stored = onnx.load_from_string(archive.read("model.onnx"))
    # The file's graph names its data member, not the machine's temporary directory.
    assert graph.weights_dir(stored) is None
    assert {e.value for t in external_initializers(stored) for e in t.external_data if e.key == "location"} == {
        ONNX_DATA_MEMBER
    }
    loaded = trtopt.load(path)
    assert graph.weights_dir(loaded.onnx_model) != graph.weights_dir(module.onnx_model)
    assert torch.equal(loaded(x), module(x))
    # A loaded module saves again (its weights are read from its own directory).
    again = trtopt.load(loaded.save(tmp_path / "again.trtopt"))
    assert torch.equal(again(x), module(x))


def test_checksums_are_verified_without_reading_the_weights_into_memory(compiled, tmp_path, monkeypatch):
    model, module, _ = compiled
    path = module.save(tmp_path / "m.trtopt")
    monkeypatch.setattr(trtopt.module, "STREAM_CHUNK_BYTES", 16 * 1024)  # the default (16 MiB) exceeds this file
    tracemalloc.start()
    try:
        onnx_model, _, _ = read_module_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Streamed in chunks straight to disk: Python never held the data member (0.3 MB) at once.
    assert peak < weight_bytes(model) // 2
    data = graph.weights_dir(onnx_model) / ONNX_DATA_MEMBER
    assert data.stat().st_size >= weight_bytes(model)
    graph.discard_weights_dir(graph.weights_dir(onnx_model))
    assert not data.exists()


def test_a_corrupt_data_member_fails_its_checksum_and_leaves_nothing_behind(compiled, tmp_path, monkeypatch):
    _, module, _ = compiled
    path = module.save(tmp_path / "m.trtopt")
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    data = bytearray(members[ONNX_DATA_MEMBER])
    data[len(data) // 2] ^= 0xFF
    members[ONNX_DATA_MEMBER] = bytes(data)
    with zipfile.ZipFile(tmp_path / "bad.trtopt", "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    made = []
    real_new = graph.new_weights_dir

    def recording_new_weights_dir():
        made.append(real_new())
        return made[-1]

    monkeypatch.setattr("trtopt.module.new_weights_dir", recording_new_weights_dir)
    with pytest.raises(trtopt.ModuleFileError, match="model.onnx.data does not match its checksum"):
        trtopt.load(tmp_path / "bad.trtopt")
    assert made and not made[0].exists()


def test_export_onnx_and_triton_write_external_data_beside_the_graph(compiled, tmp_path):
    model, module, x = compiled
    written = module.export_onnx(tmp_path / "out" / "m.onnx")
    onnx_path = written["onnx"]
    assert (onnx_path.parent / "m.onnx.data").stat().st_size >= weight_bytes(model)
    assert graph.weights_dir(onnx.load(str(onnx_path), load_external_data=False)) is None
    # A plain ONNX Runtime session from the path finds the data beside it.
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], module(x).numpy(), rtol=1e-6, atol=1e-6)

    model_dir = module.export_triton(tmp_path / "repo", "mlp")
    version = model_dir / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx.data"]
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], module(x).numpy(), rtol=1e-6, atol=1e-6)


def test_an_onnx_file_with_external_data_compiles_with_its_weights_on_disk(small_threshold, tmp_path):
    model = mlp()
    x = torch.randn(2, WIDTH)
    reference = trtopt.compile(model, (x,), backend="onnxruntime")
    path = reference.export_onnx(tmp_path / "m.onnx")["onnx"]
    module = trtopt.compile(path, backend="onnxruntime")
    assert graph.weights_dir(module.onnx_model) is not None
    assert torch.equal(module(x), reference(x))


def test_small_models_keep_their_weights_in_the_proto_and_file_version_1(tmp_path):
    model = mlp()
    module = trtopt.compile(model, (torch.randn(2, WIDTH),), backend="onnxruntime")
    assert graph.weights_dir(module.onnx_model) is None and not external_initializers(module.onnx_model)
    with zipfile.ZipFile(module.save(tmp_path / "m.trtopt")) as archive:
        assert json.loads(archive.read("manifest.json"))["format_version"] == 1
        assert ONNX_DATA_MEMBER not in archive.namelist()


def test_offload_leaves_the_source_untouched_and_aligns_each_tensor():
    model = trtopt.compile(mlp(), (torch.randn(2, WIDTH),), backend="onnxruntime").onnx_model
    before = model.SerializeToString()
    offloaded = graph.offload_weights(model)
    try:
        assert model.SerializeToString() == before
        offsets = [int(e.value) for t in external_initializers(offloaded) for e in t.external_data if e.key == "offset"]
        assert offsets and all(o % graph.EXTERNAL_DATA_ALIGNMENT == 0 for o in offsets)
        restored = graph.load_weights(offloaded)
        assert graph.weights_dir(restored) is None
        for a, b in zip(model.graph.initializer, restored.graph.initializer):
            assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    finally:
        graph.discard_weights_dir(graph.weights_dir(offloaded))


def test_an_exported_program_takes_the_same_path(small_threshold):
    model = mlp()
    x = torch.randn(2, WIDTH)
    module = trtopt.compile(torch.export.export(model, (x,)), (x,), backend="onnxruntime")
    assert graph.weights_dir(module.onnx_model) is not None
    np.testing.assert_allclose(module(x).numpy(), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_fp16_and_int8_on_disk_compute_what_they_compute_in_memory(precision, monkeypatch, tmp_path):
    model = mlp()
    x = torch.randn(4, WIDTH)
    calibration = [(torch.randn(4, WIDTH),) for _ in range(10)]

    def compiled():
        return trtopt.compile(model, (x,), precision=precision, calibration_data=calibration, backend="onnxruntime")

    _measure_without_prepacking(monkeypatch)
    in_memory = compiled()
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 10_000)
    on_disk = compiled()
    assert graph.weights_dir(in_memory.onnx_model) is None and graph.weights_dir(on_disk.onnx_model) is not None
    assert torch.equal(on_disk(x), in_memory(x))
    assert torch.equal(trtopt.load(on_disk.save(tmp_path / "m.trtopt"))(x), in_memory(x))


class _MaskedBlock(torch.nn.Module):
    """LayerNorm -> Linear -> attention with a finfo.min mask -> Linear: the FP16 mask rewrite,
    SmoothQuant (folded into the norm) and both Q/DQ passes each rewrite a weight of it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.q = torch.nn.Linear(WIDTH, WIDTH)
        self.out = torch.nn.Linear(WIDTH, 8)
        mask = torch.zeros(TOKENS, TOKENS)
        mask[:, TOKENS // 2 :] = torch.finfo(torch.float32).min
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(self.norm(x))
        scores = h @ h.transpose(1, 2) / 16 + self.mask
        return self.out(torch.softmax(scores, -1) @ h)


TOKENS = 32  # the mask's 4 KB puts it on disk too


def _graph_content(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], dict[str, tuple[int, list[int], bytes]]]:
    """Nodes, and every initializer's type, shape and bytes (read from disk when it is there)."""
    values = {t.name: (t.data_type, list(t.dims), graph.read_weight(model, t).tobytes()) for t in model.graph.initializer}
    return list(model.graph.node), values


def _report_content(module: trtopt.CompiledModule) -> dict:
    report = module.precision_report.to_json()
    report.pop("calibration_seconds", None)
    return report


def _measure_without_prepacking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths' sessions skip ONNX Runtime's prepacked weights, so the passes are compared under the
    same kernels: the on-disk path measures without them (memory) and the in-memory one with them,
    and the two kinds of GEMM kernel round differently in the last bits (docs/design.md)."""
    real = executor_session.make_session

    def unpacked(model: onnx.ModelProto, *args, prepack: bool = True, **kwargs):
        return real(model, *args, prepack=False, **kwargs)

    monkeypatch.setattr(executor_session, "make_session", unpacked)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_fp16_and_int8_passes_on_disk_write_the_same_graph_without_loading_the_weights(precision, monkeypatch):
    model = _MaskedBlock().eval()
    x = torch.randn(2, TOKENS, WIDTH)
    calibration = [(torch.randn(2, TOKENS, WIDTH),) for _ in range(6)]

    def compiled():
        return trtopt.compile(model, (x,), precision=precision, calibration_data=calibration, backend="onnxruntime")

    _measure_without_prepacking(monkeypatch)
    in_memory = compiled()
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 10_000)
    # Every ONNX Runtime session the passes and the backend create gets a proto without the weights
    # (the probe, the FP16 check, the CPU Q/DQ lowering, the readout): none loads them into memory.
    session_protos = []
    real_session = ort.InferenceSession

    def session(model, *args, **kwargs):
        # bytes: the proto, the weights read from the weights directory; a path: a temporary copy
        # of a model whose weights were loaded into memory (a proto over the threshold)
        session_protos.append(len(model) if isinstance(model, bytes) else model)
        return real_session(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    on_disk = compiled()
    monkeypatch.setattr(ort, "InferenceSession", real_session)
    assert len(session_protos) >= 3, session_protos
    assert all(isinstance(n, int) and n < weight_bytes(model) / 20 for n in session_protos), session_protos
    assert graph.weights_dir(in_memory.onnx_model) is None
    # The rewritten weights (FP16 copies, INT8 codes, smoothed weights, the FP16-safe mask) are on disk.
    assert external_initializers(on_disk.onnx_model)
    assert sum(t.ByteSize() for t in on_disk.onnx_model.graph.initializer) < weight_bytes(model) / 20
    report = _report_content(on_disk)
    assert report == _report_content(in_memory)
    assert report["fp16_safe_masks"] if precision == "fp16" else report["smoothquant"]["tensors"]
    nodes, values = _graph_content(on_disk.onnx_model)
    assert (nodes, values) == _graph_content(in_memory.onnx_model)  # codes, scales, keep-lists, Casts
    assert torch.equal(on_disk(x), in_memory(x))


@pytest.mark.parametrize("layout", ["tensorrt", "cpu"])
def test_int8_convolutions_on_disk_give_the_same_graph_and_outputs(layout, monkeypatch):
    """Conv + BatchNorm + ReLU: the CPU lowering's integer kernels and folded weights, on disk."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 64, 10),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    calibration = [(torch.randn(2, 3, 8, 8),) for _ in range(6)]

    def compiled():
        return trtopt.compile(
            model, (x,), precision="int8", calibration_data=calibration, backend="onnxruntime", int8_layout=layout
        )

    _measure_without_prepacking(monkeypatch)
    in_memory = compiled()
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 10_000)
    on_disk = compiled()
    assert external_initializers(on_disk.onnx_model)
    assert _report_content(on_disk) == _report_content(in_memory)
    assert _graph_content(on_disk.onnx_model) == _graph_content(in_memory.onnx_model)
    assert torch.equal(on_disk(x), in_memory(x))


def test_the_fp16_check_of_a_qdq_graph_does_not_probe_dequantized_weights():
    from trtopt.precision.probe import probed_tensors

    model = mlp()
    x = torch.randn(4, WIDTH)
    module = trtopt.compile(
        model, (x,), precision="int8", calibration_data=[(torch.randn(4, WIDTH),) for _ in range(4)],
        backend="onnxruntime",
    )
    quantized = module.onnx_model
    initializers = {t.name for t in quantized.graph.initializer}
    dequantize = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    weights = {n.output[0] for n in dequantize if n.input[0] in initializers}
    activations = {n.output[0] for n in dequantize if n.input[0] not in initializers}
    assert weights and activations
    probed = set(probed_tensors(graph.check_model(quantized)))
    # A weight's dequantized copy is the same on every batch and as big as the weight.
    assert not weights & probed
    assert activations <= probed


def test_cleanup_folds_weight_subgraphs_on_disk_as_in_memory(monkeypatch):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((WIDTH, 64)).astype(np.float32), "w")
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="t"), helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")]
    model = helper.make_model(
        helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, WIDTH])], [w],
        ),
        opset_imports=[helper.make_opsetid("", 19)],
    )
    in_memory = trtopt.compile(model, backend="onnxruntime").onnx_model
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 10_000)
    module = trtopt.compile(model, backend="onnxruntime")  # holds the weights directory
    on_disk = module.onnx_model
    assert [n.op_type for n in on_disk.graph.node] == ["MatMul"]  # the Transpose of the weight is folded
    assert [t.name for t in external_initializers(on_disk)] == ["wt"]  # and its result is on disk
    assert _graph_content(on_disk) == _graph_content(in_memory)


def test_serialized_parts_parse_back_to_the_model():
    from onnx import TensorProto, helper, numpy_helper

    values = np.random.default_rng(0).standard_normal((600, 500)).astype(np.float32)
    weights = numpy_helper.from_array(values, "w")  # 1.2 MB: multi-byte length varints
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])  # float_data, no raw_data
    empty = numpy_helper.from_array(np.zeros((0,), np.float32), "empty")  # raw_data set and empty
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = helper.make_model(
        helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 600])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 500])], [weights, typed, empty],
        ),
        opset_imports=[helper.make_opsetid("", 19)],
    )
    model.metadata_props.add(key="k", value="v")
    joined = graph.serialize(model)
    assert len(joined) == model.ByteSize()
    assert onnx.load_from_string(joined) == model
    session = ort.InferenceSession(joined, providers=["CPUExecutionProvider"])
    x = np.ones((2, 600), np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ values, rtol=1e-4, atol=1e-4)


def test_measuring_sessions_skip_prepacking_only_for_weights_on_disk(monkeypatch):
    # In memory every session prepacks as before (calibration ranges unchanged in the last bits);
    # on disk the measuring ones do not (one copy of the weights resident), the module's own does.
    calls = []
    real = executor_session.make_session

    def spy(model: onnx.ModelProto, *args, prepack: bool = True, **kwargs):
        calls.append((graph.weights_dir(model) is not None, prepack))
        return real(model, *args, prepack=prepack, **kwargs)

    monkeypatch.setattr(executor_session, "make_session", spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 4)).eval()
    x = torch.randn(2, WIDTH)
    calibration = [(torch.randn(2, WIDTH),) for _ in range(4)]
    trtopt.compile(model, (x,), precision="int8", calibration_data=calibration, backend="onnxruntime")
    assert calls and all(not on_disk and prepack for on_disk, prepack in calls), calls
    calls.clear()
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 10_000)
    trtopt.compile(model, (x,), precision="int8", calibration_data=calibration, backend="onnxruntime",
                   dynamic_shapes={"input": {0: (1, 2, 4)}})  # the profile-shape check measures too
    assert all(on_disk for on_disk, _ in calls), calls
    assert [prepack for _, prepack in calls] == [False] * (len(calls) - 1) + [True], calls  # the module's last


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_compiled_modules_weights_directory_holds_only_what_its_graph_uses(precision, monkeypatch, tmp_path):
    # The passes and each session's FP16 emulation write new weight files as they go; the module keeps
    # only its graph's (the reviewer measured 20 files, 2.4 MB, for 3 used, 0.27 MB, before).
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 10_000)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(), torch.nn.Linear(WIDTH, 4)).eval()
    x = torch.randn(2, WIDTH)
    module = trtopt.compile(model, (x,), precision=precision, calibration_data=[(torch.randn(2, WIDTH),)] * 4,
                            backend="onnxruntime")
    directory = graph.weights_dir(module.onnx_model)
    used = {dict((e.key, e.value) for e in t.external_data)["location"] for t in external_initializers(module.onnx_model)}
    assert used and {p.name for p in directory.iterdir()} == used
    expected = module(x)
    assert torch.equal(module(x), expected)  # the backend's session still runs
    from trtopt.bench.candidates import _pin_threads, compiled_candidate

    _pin_threads(compiled_candidate(precision, module), 1)  # `trtopt bench` re-makes the session
    assert {p.name for p in directory.iterdir()} == used and torch.equal(module(x), expected)
    module.save(tmp_path / "m.trtopt")
    loaded = trtopt.load(tmp_path / "m.trtopt")
    assert torch.equal(loaded(x), expected)
    loaded_used = {dict((e.key, e.value) for e in t.external_data)["location"]
                   for t in external_initializers(loaded.onnx_model)}
    assert {p.name for p in graph.weights_dir(loaded.onnx_model).iterdir()} == loaded_used
