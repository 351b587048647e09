"""The engine cache: what the key covers, manifests, mismatching and corrupt entries, LRU eviction.

The cache itself needs no TensorRT; the end-to-end tests at the bottom go
through ``builder.build_engine`` with FakeTensorRT (tests/trt_doubles.py),
which counts real builds, to check hits, misses and rebuilds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trtopt.backends.tensorrt import build as builder
from trtopt.config import ENGINE_SETTINGS, BuildConfig
from trtopt.backends.tensorrt.engine_cache import EngineCache, engine_key, engine_key_fields

from .helpers import PROFILES, SPEC, profile, relu_model
from .trt_doubles import FakeCuda, FakeTensorRT

GPU = {"name": "Fake GPU 80GB", "compute_capability": "8.9"}


def fields(**changes):
    base = dict(onnx_digest="a" * 64, profiles=[profile()], config=BuildConfig(), tensorrt_version="10.16.1", gpu=GPU,
                tensorrt_build="cu12", builder_settings=2)
    base.update(changes)
    return engine_key_fields(**base)


ENGINE_SETTING_CHANGES = {
    "precision": "fp16",
    "opset": 20,
    "workspace_bytes": 1 << 30,
    "optimization_level": 4,
    "version_compatible": True,
    "hardware_compatibility": "ampere_plus",
    "exclude_nodes": ("*attn*",),
    "exclude_op_types": ("Softmax",),
    "int8_keep_first_last": True,
    "int8_float_precision": "fp32",
    "int8_attention": True,
    "smoothquant": 0.5,
    "int4_block_size": 64,
    "int4_method": "awq",
    "fp16_threshold": 4096.0,
    "tf32": True,
}


def test_every_engine_setting_has_a_change_here() -> None:
    assert set(ENGINE_SETTING_CHANGES) == set(ENGINE_SETTINGS)


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_digest": "b" * 64},
        {"profiles": [profile(1, 8, 64)]},
        {"profiles": [profile(), profile(33, 40, 64)]},
        {"tensorrt_version": "11.4.0"},
        {"tensorrt_build": "cu13"},  # tensorrt-cu12 and -cu13 of one release report the same version
        {"builder_settings": 3},  # trtopt's builder sets something new: engines built before are not reused
        {"gpu": {"name": "Other GPU", "compute_capability": "8.9"}},
        {"gpu": {"name": "Fake GPU 80GB", "compute_capability": "9.0"}},
    ]
    + [{"config": BuildConfig(**{k: v})} for k, v in ENGINE_SETTING_CHANGES.items()],
    ids=lambda c: next(iter(c)) if "config" not in c else str(c["config"]).split("(")[0],
)
def test_key_changes_with_everything_the_engine_depends_on(change) -> None:
    assert engine_key(fields(**change)) != engine_key(fields())


def test_key_ignores_settings_that_do_not_change_the_engine() -> None:
    other = BuildConfig(calibrator="minmax", engine_cache_dir="/x", engine_cache_max_bytes=1, cuda_graph=True,
                        timing_cache="/t", backend="onnxruntime")
    assert engine_key(fields(config=other)) == engine_key(fields())


def test_put_get_and_manifest(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, 1 << 20)
    key_fields = fields()
    assert cache.get(key_fields) is None
    cache.put(key_fields, b"engine-bytes")
    assert cache.get(key_fields) == b"engine-bytes"
    manifest = json.loads((tmp_path / f"{engine_key(key_fields)}.json").read_text())
    assert manifest["fields"]["gpu"] == GPU and manifest["engine_bytes"] == 12
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".plan"]  # no temporary files


def test_mismatching_manifest_is_discarded_never_used(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, 1 << 20)
    key_fields = fields()
    cache.put(key_fields, b"engine-bytes")
    manifest_path = tmp_path / f"{engine_key(key_fields)}.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fields"]["tensorrt_version"] = "9.0"  # e.g. a key collision or a hand-copied entry
    manifest_path.write_text(json.dumps(manifest))
    assert cache.get(key_fields) is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "no-plan"])
def test_corrupt_entry_is_detected_and_removed(tmp_path: Path, damage: str) -> None:
    cache = EngineCache(tmp_path, 1 << 20)
    key_fields = fields()
    cache.put(key_fields, b"engine-bytes")
    plan = tmp_path / f"{engine_key(key_fields)}.plan"
    if damage == "flip":
        plan.write_bytes(b"engine-bytez")
    elif damage == "truncate":
        plan.write_bytes(b"engine")
    elif damage == "manifest":
        plan.with_suffix(".json").write_text("{not json")
    else:
        plan.unlink()
    assert cache.get(key_fields) is None
    assert list(tmp_path.iterdir()) == []


def test_least_recently_used_entries_are_evicted(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, 1 << 20)
    entries = [fields(onnx_digest=c * 64) for c in "abc"]
    for i, key_fields in enumerate(entries):
        cache.put(key_fields, bytes(1000))
        os.utime(tmp_path / f"{engine_key(key_fields)}.json", (1000 + i, 1000 + i))
    size = max(e.size for e in cache.entries())  # manifests differ by a few bytes (timestamps)
    assert cache.get(entries[0]) is not None  # "a" is now the most recently used
    cache.max_bytes = 2 * size + 50  # room for two entries, not three
    cache.put(fields(onnx_digest="d" * 64), bytes(1000))
    remaining = {e.key for e in cache.entries()}
    assert remaining == {engine_key(entries[0]), engine_key(fields(onnx_digest="d" * 64))}
    assert sum(e.size for e in cache.entries()) <= cache.max_bytes


def test_engine_larger_than_the_limit_is_not_cached(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, 100)
    assert cache.put(fields(), bytes(101)) is None
    assert cache.get(fields()) is None


def test_no_cache_without_a_directory() -> None:
    assert EngineCache.from_config(BuildConfig()) is None


# --------------------------------------------------------------- through the builder
def test_build_engine_hits_misses_and_rebuilds(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    config = BuildConfig(engine_cache_dir=str(tmp_path))
    first = builder.build_engine(relu_model(), [profile()], config)
    assert builder.build_engine(relu_model(), [profile()], config) == first
    assert fake_trt.builds == 1  # the second call was a hit

    builder.build_engine(relu_model(op="Sigmoid"), [profile()], config)  # other graph
    builder.build_engine(relu_model(), [profile(1, 8, 64)], config)  # other profile
    builder.build_engine(relu_model(), [profile()], config.replace(optimization_level=1))  # other setting
    assert fake_trt.builds == 4

    FakeCuda.compute_capability = (9, 0)  # same cache directory, other GPU
    builder.build_engine(relu_model(), [profile()], config)
    assert fake_trt.builds == 5

    FakeCuda.compute_capability = (8, 9)
    for plan in tmp_path.glob("*.plan"):
        plan.write_bytes(plan.read_bytes()[:-1])  # damage every entry
    assert builder.build_engine(relu_model(), [profile()], config) == first
    assert fake_trt.builds == 6  # rebuilt, not used
    assert builder.build_engine(relu_model(), [profile()], config) == first
    assert fake_trt.builds == 6  # and stored again


def test_a_cached_engine_tensorrt_cannot_deserialize_is_a_miss(fake_trt: FakeTensorRT, tmp_path: Path, caplog) -> None:
    """Issue 26 item 1: an entry intact on disk (checksum fine) that TensorRT refuses made compile fail."""
    import hashlib
    import logging

    from trtopt import compiler
    from trtopt.config import Backend

    config = BuildConfig(engine_cache_dir=str(tmp_path))
    spec = lambda: type(SPEC)(SPEC.inputs, SPEC.outputs, SPEC.output_structure, PROFILES, "fp32", {})  # noqa: E731
    compiler.make_backend(Backend.TENSORRT, relu_model(), spec(), config)
    (manifest_path,) = tmp_path.glob("*.json")
    bad = b"an engine of another TensorRT build"
    manifest_path.with_suffix(".plan").write_bytes(bad)
    manifest = json.loads(manifest_path.read_text())
    manifest.update(engine_bytes=len(bad), engine_sha256=hashlib.sha256(bad).hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="trtopt.engine_cache"):
        backend, engine = compiler.make_backend(Backend.TENSORRT, relu_model(), spec(), config)
    assert fake_trt.builds == 2 and engine.startswith(b"FAKE-ENGINE") and backend.name == "tensorrt"
    assert len([r for r in caplog.records if "cannot deserialize" in r.getMessage()]) == 1
    assert manifest_path.with_suffix(".plan").read_bytes() == engine  # the entry now holds the rebuilt engine
