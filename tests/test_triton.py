"""Triton model-repository export: every config.pbtxt is parsed with Triton's own
schema (``tritonclient``'s ``inference.ModelConfig``) and checked against the
model file it sits beside; the exported ONNX runs and matches the module."""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import trtopt
from trtopt.profiles import build_profiles
from trtopt.errors import ConfigError, DependencyError
from trtopt.module import CompiledModule
from trtopt.triton import export_triton

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402 - after the skip above

# ONNX element type -> the Triton type the config must name.
ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}
KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


# ------------------------------------------------------------------ models


class Tagger(torch.nn.Module):
    """Two batched inputs (float features, int64 ids of shape [N]) and two outputs (float, bool)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.embed = torch.nn.Embedding(10, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.linear(x) + self.embed(ids)
        return score, score > 0


class SequenceModel(torch.nn.Module):
    """[batch, length, 4] -> [batch, length, 3]: a dynamic dim besides the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


class Rows(torch.nn.Module):
    """[3, length]: the dynamic dim is not the first one."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([[1.0], [2.0], [3.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * self.scale


class BatchSum(torch.nn.Module):
    """One output follows the batch, one sums over it (so Triton cannot split it)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2.0, x.sum(0)


class FakeEngineModule(CompiledModule):
    """Test double: a real compiled module whose ``engine`` is placeholder bytes, not a
    TensorRT engine (none can be built here). It checks the repository layout and the
    tensorrt_plan config only; serving a real plan needs a GPU and Triton."""

    PLAN = b"FAKE-TENSORRT-PLAN-BYTES"

    def __init__(self, module: CompiledModule) -> None:
        super().__init__(module.onnx_model, module.spec, module.backend, engine=self.PLAN)


def with_profiles(module: CompiledModule, dynamic_shapes, example_shapes) -> CompiledModule:
    """The same compiled graph with other optimization profiles, built by trtopt's own
    ``build_profiles``: reaches the batch-range checks without recompiling."""
    profiles = build_profiles(dynamic_shapes, example_shapes)
    spec = dataclasses.replace(module.spec, profiles=profiles)
    return CompiledModule(module.onnx_model, spec, module.backend, module.engine)


# ------------------------------------------------------------------ helpers


def read_config(model_dir: Path):
    """Parse config.pbtxt with Triton's schema (raises on any unknown field or bad value)."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def type_name(tensor) -> str:
    return model_config_pb2.DataType.Name(tensor.data_type)


def full_dims(tensor, max_batch_size: int) -> list[int]:
    """The shape the model sees, as Triton derives it: [-1 batch] + (reshape or dims)."""
    dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
    return ([-1] if max_batch_size > 0 else []) + dims


def onnx_dims(value_info) -> list[int]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]


def check_against_onnx(config, onnx_path: Path) -> None:
    """What Triton's ONNX Runtime backend checks on load: names, types and dims match the file."""
    model = onnx.load(str(onnx_path))
    pairs = ((config.input, model.graph.input), (config.output, model.graph.output))
    for config_tensors, graph_tensors in pairs:
        assert [t.name for t in config_tensors] == [v.name for v in graph_tensors]
        for tensor, value in zip(config_tensors, graph_tensors):
            assert type_name(tensor) == ONNX_TO_TRITON[value.type.tensor_type.elem_type]
            assert full_dims(tensor, config.max_batch_size) == onnx_dims(value)


def run_like_triton(onnx_path: Path, config, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run([t.name for t in config.output], feeds)


def visible_entries(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir())


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tagger() -> CompiledModule:
    torch.manual_seed(0)
    return trtopt.compile(
        Tagger().eval(),
        (torch.randn(2, 4), torch.tensor([1, 2])),
        dynamic_shapes={"x": {0: (1, 4, 16)}, "ids": {0: (1, 4, 16)}},
        backend="onnxruntime",
    )


@pytest.fixture(scope="module")
def tagger_repo(tagger, tmp_path_factory) -> Path:
    # Through the CompiledModule method, which delegates to export_triton.
    return tagger.export_triton(tmp_path_factory.mktemp("repo"), "tagger")


@pytest.fixture(scope="module")
def static() -> CompiledModule:
    torch.manual_seed(1)
    return trtopt.compile(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),), backend="onnxruntime")


@pytest.fixture(scope="module")
def sequence() -> CompiledModule:
    torch.manual_seed(2)
    return trtopt.compile(
        SequenceModel().eval(),
        (torch.randn(2, 5, 4),),
        dynamic_shapes=[
            {"x": {0: (1, 4, 8), 1: (2, 5, 10)}},
            {"x": {0: (9, 16, 32), 1: (2, 5, 10)}},
        ],
        backend="onnxruntime",
    )


@pytest.fixture(scope="module")
def sequence_repo(sequence, tmp_path_factory) -> Path:
    return export_triton(sequence, tmp_path_factory.mktemp("repo"), "seq")


# ------------------------------------------------------------------ round trips


def test_dynamic_batch_config_matches_model(tagger, tagger_repo):
    config = read_config(tagger_repo)
    assert config.name == "tagger"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16  # the profile's max batch
    assert [(t.name, type_name(t), list(t.dims)) for t in config.input] == [
        ("x", "TYPE_FP32", [4]),
        ("ids", "TYPE_INT64", [1]),  # batch-only input: [1] reshaped to [] per request
    ]
    assert config.input[1].HasField("reshape") and list(config.input[1].reshape.shape) == []
    assert not config.input[0].HasField("reshape")
    assert [(t.name, type_name(t), list(t.dims)) for t in config.output] == [
        (tagger.output_names[0], "TYPE_FP32", [3]),
        (tagger.output_names[1], "TYPE_BOOL", [3]),
    ]
    assert list(config.dynamic_batching.preferred_batch_size) == [4]  # the profile's opt batch
    assert len(config.instance_group) == 1
    group = config.instance_group[0]
    assert (group.kind, group.count, list(group.profile)) == (KIND_CPU, 1, [])
    assert visible_entries(tagger_repo) == ["1", "config.pbtxt"]
    assert visible_entries(tagger_repo / "1") == ["model.onnx"]
    check_against_onnx(config, tagger_repo / "1" / "model.onnx")


def test_dynamic_batch_model_file_runs_and_matches(tagger, tagger_repo):
    config = read_config(tagger_repo)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)).astype(np.float32)  # a batch Triton might form: 5 requests
    ids = rng.integers(0, 10, size=5).astype(np.int64)
    got = run_like_triton(tagger_repo / "1" / "model.onnx", config, {"x": x, "ids": ids})
    expected = tagger(x, ids)
    assert len(got) == len(expected) == 2
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[1].dtype == np.bool_


def test_static_shapes_give_max_batch_size_zero(static, tmp_path):
    model_dir = export_triton(static, tmp_path, "linear")
    config = read_config(model_dir)
    assert config.max_batch_size == 0
    assert [list(t.dims) for t in config.input] == [[2, 4]]  # full shapes, batch included
    assert [list(t.dims) for t in config.output] == [[2, 3]]
    assert not config.HasField("dynamic_batching")  # Triton cannot batch a fixed batch
    assert config.instance_group[0].kind == KIND_CPU
    onnx_path = model_dir / "1" / "model.onnx"
    check_against_onnx(config, onnx_path)
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    (got,) = run_like_triton(onnx_path, config, {static.input_names[0]: x})
    np.testing.assert_allclose(got, static(x), rtol=1e-5, atol=1e-6)
    # Readable by a Triton server running as another user.
    assert stat.S_IMODE(os.stat(onnx_path).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(model_dir / "1").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(model_dir / "config.pbtxt").st_mode) == 0o644


def test_several_profiles_onnx(sequence, sequence_repo):
    config = read_config(sequence_repo)
    assert config.max_batch_size == 32  # largest batch over both profiles
    assert [list(t.dims) for t in config.input] == [[-1, 4]]  # the length stays dynamic
    assert [list(t.dims) for t in config.output] == [[-1, 3]]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]  # each profile's opt
    # Profiles are a TensorRT notion; Triton rejects them on other backends.
    assert list(config.instance_group[0].profile) == []
    onnx_path = sequence_repo / "1" / "model.onnx"
    check_against_onnx(config, onnx_path)
    x = np.random.default_rng(2).standard_normal((12, 7, 4)).astype(np.float32)  # in profile 1
    (got,) = run_like_triton(onnx_path, config, {"x": x})
    np.testing.assert_allclose(got, sequence(x), rtol=1e-5, atol=1e-6)


def test_several_profiles_plan_layout_and_config(sequence, tmp_path):
    """Test double (FakeEngineModule): checks file layout and config only."""
    model_dir = export_triton(FakeEngineModule(sequence), tmp_path, "seq_trt", version=3, instances=2)
    config = read_config(model_dir)
    assert config.platform == "tensorrt_plan"
    assert visible_entries(model_dir) == ["3", "config.pbtxt"]
    assert visible_entries(model_dir / "3") == ["model.plan"]
    assert (model_dir / "3" / "model.plan").read_bytes() == FakeEngineModule.PLAN
    assert config.max_batch_size == 32
    assert [list(t.dims) for t in config.input] == [[-1, 4]]
    assert len(config.instance_group) == 1
    group = config.instance_group[0]
    assert group.kind == KIND_GPU and group.count == 2
    assert list(group.profile) == ["0", "1"]  # Triton picks a profile per request shape


def test_single_profile_plan_lists_no_profile(tagger, tmp_path):
    """Test double (FakeEngineModule): checks the config only."""
    config = read_config(export_triton(FakeEngineModule(tagger), tmp_path, "t"))
    assert config.platform == "tensorrt_plan"
    assert config.instance_group[0].kind == KIND_GPU
    assert list(config.instance_group[0].profile) == []


def test_explicit_max_batch_size_and_options(sequence, tmp_path):
    model_dir = export_triton(
        sequence, tmp_path, "seq", max_batch_size=8, dynamic_batching=False, instances=3
    )
    config = read_config(model_dir)
    assert config.max_batch_size == 8
    assert not config.HasField("dynamic_batching")
    assert config.instance_group[0].count == 3


def test_preferred_sizes_stay_within_max_batch_size(sequence, tmp_path):
    config = read_config(export_triton(sequence, tmp_path, "seq", max_batch_size=8))
    assert list(config.dynamic_batching.preferred_batch_size) == [4]  # 16 > 8 is left out


def test_max_batch_size_zero_serves_full_shapes(sequence, tmp_path):
    config = read_config(export_triton(sequence, tmp_path, "seq", max_batch_size=0))
    assert config.max_batch_size == 0
    assert [list(t.dims) for t in config.input] == [[-1, -1, 4]]
    assert not config.HasField("dynamic_batching")


# ------------------------------------------------------------------ batch errors


@pytest.fixture(scope="module")
def rows() -> CompiledModule:
    return trtopt.compile(
        Rows().eval(), (torch.randn(3, 8),), dynamic_shapes={"x": {1: (2, 8, 16)}}, backend="onnxruntime"
    )


def test_dynamic_dim_not_first(rows, tmp_path):
    config = read_config(export_triton(rows, tmp_path, "rows"))
    assert config.max_batch_size == 0  # served unbatched, with the full shape
    assert [list(t.dims) for t in config.input] == [[3, -1]]
    check_against_onnx(config, tmp_path / "rows" / "1" / "model.onnx")
    with pytest.raises(ConfigError, match="batches along the first dimension.*dynamic dimension 1"):
        export_triton(rows, tmp_path, "rows2", max_batch_size=4)


def test_static_model_cannot_be_batched(static, tmp_path):
    with pytest.raises(ConfigError, match="fixed first dimension.*dynamic_shapes"):
        export_triton(static, tmp_path, "linear", max_batch_size=4)
    assert not (tmp_path / "linear").exists()


def test_output_not_following_the_batch(tmp_path):
    module = trtopt.compile(
        BatchSum().eval(),
        (torch.randn(2, 4),),
        dynamic_shapes={"x": {0: (1, 4, 8)}},
        backend="onnxruntime",
    )
    with pytest.raises(ConfigError, match=f"output '{module.output_names[1]}'.*max_batch_size=0"):
        export_triton(module, tmp_path, "sum")
    config = read_config(export_triton(module, tmp_path, "sum", max_batch_size=0))
    assert [list(t.dims) for t in config.output] == [[-1, 4], [4]]


def test_inputs_disagreeing_on_batch_range(tagger, tmp_path):
    module = with_profiles(
        tagger, {"x": {0: (1, 4, 16)}, "ids": {0: (1, 4, 8)}}, {"x": (2, 4), "ids": (2,)}
    )
    with pytest.raises(ConfigError, match=r"disagree on the batch range \(x: 1..16 .*ids: 1..8"):
        export_triton(module, tmp_path, "t")


def test_max_batch_size_beyond_profiles(tagger, tmp_path):
    with pytest.raises(ConfigError, match=r"max_batch_size=64 is larger than .*\(16;"):
        export_triton(tagger, tmp_path, "t", max_batch_size=64)


def test_profile_not_starting_at_one(tagger, tmp_path):
    module = with_profiles(
        tagger, {"x": {0: (2, 4, 16)}, "ids": {0: (2, 4, 16)}}, {"x": (2, 4), "ids": (2,)}
    )
    with pytest.raises(ConfigError, match=r"batch sizes 1..1 are in no optimization profile"):
        export_triton(module, tmp_path, "t")


def test_profiles_with_a_gap(sequence, tmp_path):
    shapes = {"x": (2, 5, 4)}
    module = with_profiles(
        sequence,
        [{"x": {0: (1, 4, 8), 1: (2, 5, 10)}}, {"x": {0: (16, 16, 32), 1: (2, 5, 10)}}],
        shapes,
    )
    with pytest.raises(ConfigError, match=r"batch sizes 9..15 are in no .*max_batch_size<=8"):
        export_triton(module, tmp_path, "seq")
    # Up to the gap is servable.
    config = read_config(export_triton(module, tmp_path, "seq", max_batch_size=8))
    assert config.max_batch_size == 8


# ------------------------------------------------------------------ arguments and files


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "a/b"}, "single directory name"),
        ({"name": "a\\b"}, "single directory name"),
        ({"name": ".."}, "single directory name"),
        ({"name": ""}, "single directory name"),
        ({"version": 0}, "version=0"),
        ({"version": "1"}, "version='1'"),
        ({"instances": 0}, "instances=0"),
        ({"max_batch_size": -1}, "max_batch_size=-1"),
    ],
)
def test_bad_arguments(static, tmp_path, kwargs, match):
    args = {"name": "m", **kwargs}
    name = args.pop("name")
    with pytest.raises(ConfigError, match=match):
        export_triton(static, tmp_path / "repo", name, **args)
    assert not (tmp_path / "repo").exists()


def test_refuses_to_overwrite_a_version(static, tmp_path):
    model_dir = export_triton(static, tmp_path, "m")
    (model_dir / "1" / "model.onnx").write_bytes(b"stale")
    with pytest.raises(ConfigError, match="already exists; pass overwrite=True"):
        export_triton(static, tmp_path, "m")
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"stale"
    export_triton(static, tmp_path, "m", overwrite=True)
    assert onnx.load(str(model_dir / "1" / "model.onnx")).graph.input[0].name == static.input_names[0]
    export_triton(static, tmp_path, "m", version=2)
    assert visible_entries(model_dir) == ["1", "2", "config.pbtxt"]  # no staging leftovers


def test_missing_tritonclient_is_a_dependency_error(static, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # import now fails
    with pytest.raises(DependencyError, match=r"trtopt\[triton\]"):
        export_triton(static, tmp_path, "m")


# ------------------------------------------------------------------ python flavour


def test_python_flavour_writes_the_module_and_a_model_py_with_the_same_config(tagger, tagger_repo, tmp_path):
    model_dir = export_triton(tagger, tmp_path, "tagger", flavour="python", max_queue_delay_us=250)
    config, native = read_config(model_dir), read_config(tagger_repo)
    assert (config.backend, config.platform) == ("python", "")
    # One derivation: everything but the runtime and the queue delay is the native flavour's.
    config.ClearField("backend")
    config.platform = native.platform
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    config.dynamic_batching.ClearField("max_queue_delay_microseconds")
    assert config == native
    assert visible_entries(model_dir / "1") == ["model.py", "model.trtopt"]
    assert "from trtopt.triton_python import TritonPythonModel" in (model_dir / "1" / "model.py").read_text()
    reloaded = trtopt.load(model_dir / "1" / "model.trtopt", backend="onnxruntime")
    x, ids = np.ones((2, 4), np.float32), np.array([1, 2])
    np.testing.assert_array_equal(reloaded(x, ids)[0], tagger(x, ids)[0])


def test_python_flavour_of_an_engine_module_runs_on_the_gpu(tagger, tmp_path):
    """Test double (FakeEngineModule): checks the config only (the stub runs trtopt on the GPU)."""
    config = read_config(export_triton(FakeEngineModule(tagger), tmp_path, "t", flavour="python"))
    assert config.backend == "python" and config.instance_group[0].kind == KIND_GPU


@pytest.mark.parametrize(
    "kwargs, match",
    [({"flavour": "pytorch"}, "flavour='pytorch'"), ({"max_queue_delay_us": -5}, "max_queue_delay_us=-5")],
)
def test_bad_flavour_and_queue_delay(static, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        export_triton(static, tmp_path / "repo", "m", **kwargs)
    assert not (tmp_path / "repo").exists()
