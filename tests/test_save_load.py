"""save/load round trip, and clear errors for files that are not what they claim."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

import trtopt
from tests._models import TwoInputsDictOut
from tests.helpers import flat


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    return trtopt.compile(
        TwoInputsDictOut().eval(),
        (torch.randn(2, 6), torch.randn(2, 3)),
        dynamic_shapes=[
            {"left": {0: (1, 2, 4)}, "right": {0: (1, 2, 4)}},
            {"left": {0: (5, 8, 8)}, "right": {0: (5, 8, 8)}},
        ],
        backend="onnxruntime",
    )


def test_round_trip_gives_identical_outputs(compiled, tmp_path):
    path = compiled.save(tmp_path / "m.trtopt")
    loaded = trtopt.load(path)
    assert loaded.spec == compiled.spec
    for batch in (1, 3, 7):
        left, right = torch.randn(batch, 6), torch.randn(batch, 3)
        for a, b in zip(flat(loaded(left, right)), flat(compiled(left, right))):
            assert torch.equal(a, b)


def test_save_is_atomic_and_leaves_no_temporary_files(compiled, tmp_path):
    compiled.save(tmp_path / "m.trtopt")
    compiled.save(tmp_path / "m.trtopt")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.trtopt"]


def test_truncated_file(compiled, tmp_path):
    data = compiled.save(tmp_path / "m.trtopt").read_bytes()
    (tmp_path / "cut.trtopt").write_bytes(data[: len(data) // 2])
    with pytest.raises(trtopt.ModuleFileError, match="truncated, corrupt or not a trtopt module"):
        trtopt.load(tmp_path / "cut.trtopt")


def test_foreign_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(trtopt.ModuleFileError, match="not a trtopt module"):
        trtopt.load(tmp_path / "notes.txt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.md", "a zip, but not ours")
    with pytest.raises(trtopt.ModuleFileError, match="no manifest.json"):
        trtopt.load(tmp_path / "other.zip")
    with pytest.raises(trtopt.ModuleFileError, match="does not exist"):
        trtopt.load(tmp_path / "missing.trtopt")


def _rewrite(src, dst, change):
    with zipfile.ZipFile(src) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_corrupt_member_and_newer_format(compiled, tmp_path):
    path = compiled.save(tmp_path / "m.trtopt")

    def flip_a_byte(members):
        onnx_bytes = bytearray(members["model.onnx"])
        onnx_bytes[len(onnx_bytes) // 2] ^= 0xFF
        members["model.onnx"] = bytes(onnx_bytes)

    _rewrite(path, tmp_path / "corrupt.trtopt", flip_a_byte)
    with pytest.raises(trtopt.ModuleFileError, match="model.onnx does not match its checksum"):
        trtopt.load(tmp_path / "corrupt.trtopt")

    def bump_version(members):
        manifest = json.loads(members["manifest.json"])
        manifest["format_version"] = 99
        members["manifest.json"] = json.dumps(manifest).encode()

    _rewrite(path, tmp_path / "future.trtopt", bump_version)
    with pytest.raises(trtopt.ModuleFileError, match="format version 99.*recompile"):
        trtopt.load(tmp_path / "future.trtopt")


def test_a_manifest_without_the_graph_is_a_module_file_error(compiled, tmp_path):
    path = compiled.save(tmp_path / "m.trtopt")

    def drop_the_graph(members):
        manifest = json.loads(members["manifest.json"])
        del manifest["sha256"]["model.onnx"]
        members["manifest.json"] = json.dumps(manifest).encode()

    _rewrite(path, tmp_path / "graphless.trtopt", drop_the_graph)
    with pytest.raises(trtopt.ModuleFileError, match="manifest lists no model.onnx; recompile"):
        trtopt.load(tmp_path / "graphless.trtopt")


def test_saved_files_get_ordinary_permissions(compiled, tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = compiled.save(tmp_path / "m.trtopt")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_an_engine_in_the_file_survives_loading_on_onnxruntime(compiled, tmp_path):
    from trtopt.module import CompiledModule

    with_engine = CompiledModule(compiled.onnx_model, compiled.spec, compiled.backend, engine=b"serialized engine bytes")
    loaded = trtopt.load(with_engine.save(tmp_path / "m.trtopt"), backend="onnxruntime")
    assert loaded.backend_name == "onnxruntime"
    assert loaded.engine == b"serialized engine bytes"


def test_load_keeps_the_engine_settings_and_takes_overrides(tmp_path):
    model = TwoInputsDictOut().eval()
    compiled = trtopt.compile(
        model, (torch.randn(2, 6), torch.randn(2, 3)), backend="onnxruntime",
        optimization_level=5, workspace_bytes=1 << 30, exclude_op_types=["Tanh"],
    )
    stored = compiled.spec.info["build_config"]
    assert stored["optimization_level"] == 5 and stored["workspace_bytes"] == 1 << 30
    assert stored["exclude_op_types"] == ["Tanh"] and stored["precision"] == "fp32"
    path = compiled.save(tmp_path / "m.trtopt")
    loaded = trtopt.load(path, backend="onnxruntime", cuda_graph=True)
    assert loaded.spec.info["build_config"] == stored
    with pytest.raises(trtopt.ConfigError, match="unknown setting"):
        trtopt.load(path, backend="onnxruntime", warp_speed=1)


# ----------------------------------------------------- issue 23 (9): paths that cannot be saved or loaded


def test_save_onto_a_directory_names_it_and_the_fix(compiled, tmp_path):
    target = tmp_path / "models"
    target.mkdir()
    with pytest.raises(trtopt.ModuleFileError) as caught:
        compiled.save(target)
    message = str(caught.value)
    assert str(target) in message and "is a directory" in message
    assert str(target / "model.trtopt") in message  # the fix: a file path inside it
    assert ".tmp" not in message  # no internal temporary file names
    assert list(target.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_save_under_a_file_names_the_file_in_the_way(compiled, tmp_path):
    (tmp_path / "notes").write_text("a file where a directory should be")
    with pytest.raises(trtopt.ModuleFileError, match=r"notes is a file, not a directory") as caught:
        compiled.save(tmp_path / "notes" / "sub" / "m.trtopt")
    assert ".tmp" not in str(caught.value)


def test_save_creates_missing_parent_directories(compiled, tmp_path):
    path = compiled.save(tmp_path / "new" / "deeper" / "m.trtopt")
    assert trtopt.load(path).spec == compiled.spec


def test_save_that_cannot_write_is_a_module_file_error(compiled, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full_disk)
    with pytest.raises(trtopt.ModuleFileError, match=r"cannot write the module file .*m\.trtopt: No space left"):
        compiled.save(tmp_path / "m.trtopt")
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


def test_load_of_a_directory_says_it_is_a_directory(compiled, tmp_path):
    compiled.save(tmp_path / "a.trtopt")
    with pytest.raises(trtopt.ModuleFileError, match=r"is a directory, not a module file \(it holds a\.trtopt\)"):
        trtopt.load(tmp_path)


def test_load_of_a_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(trtopt.ModuleFileError, match=r"missing\.trtopt does not exist; check the path.*CompiledModule\.save"):
        trtopt.load(tmp_path / "missing.trtopt")
