"""A directory of built TensorRT engines, so the same model is built once per GPU.

Building an engine takes seconds to many minutes; the result depends only on
the final ONNX graph, the settings in ``ENGINE_SETTINGS``, the optimization
profiles, the TensorRT version and CUDA build, the version of trtopt's builder
settings and the GPU. Those, and nothing else, make up
the key. Each entry is two files in ``cache_dir``::

    <key>.plan   the serialized engine
    <key>.json   its manifest: the key's fields, the engine's size and SHA-256

The manifest is written last (atomically, like the plan), so an entry exists
only once it is complete. On lookup the manifest's fields must equal the
expected ones and the plan must match its checksum; an entry that fails either
check, or that TensorRT then cannot deserialize (``discard``), is deleted and
reported as a miss, so it is rebuilt, never used. The
cache is kept under ``max_bytes`` by deleting the least recently used entries
(a hit touches the manifest's mtime). Several processes may share a directory:
every write is a rename, and an entry deleted under a reader is just a miss.

The cache is off unless ``BuildConfig.engine_cache_dir`` is set: engines are
large (often hundreds of MB) and trtopt does not write to the home directory
unasked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._version import __version__
from ...config import ENGINE_SETTINGS, BuildConfig
from ...profiles import ShapeProfile
from ...files import atomic_write

logger = logging.getLogger("trtopt.engine_cache")  # the name it has logged under since before the move

MANIFEST_FORMAT = "trtopt-engine-cache-entry"
MANIFEST_VERSION = 1


def files_digest(paths: Sequence[Path]) -> str:
    """SHA-256 over the names and contents of ``paths`` (an ONNX file and its external data)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def engine_key_fields(
    onnx_digest: str,
    profiles: Sequence[ShapeProfile],
    config: BuildConfig,
    tensorrt_version: str,
    gpu: Mapping[str, Any],
    *,
    tensorrt_build: str,
    builder_settings: int,
) -> dict[str, Any]:
    """Everything an engine depends on, as JSON-ready data (hashed into the key, kept in the manifest).

    ``tensorrt_build`` tells the CUDA builds of one TensorRT version apart (``tensorrt-cu12`` and
    ``-cu13`` report the same ``__version__``); ``builder_settings`` is the version of what trtopt's
    builder sets beyond ``config`` (``builder.BUILDER_SETTINGS_VERSION``), so engines built before
    such a change are not reused.
    """
    settings = {}
    for name in ENGINE_SETTINGS:
        value = getattr(config, name)
        settings[name] = value.value if hasattr(value, "value") else value
    return {
        "onnx_sha256": onnx_digest,
        "settings": settings,
        "profiles": [p.to_json() for p in profiles],
        "tensorrt_version": tensorrt_version,
        "tensorrt_build": tensorrt_build,
        "builder_settings": builder_settings,
        "gpu": dict(gpu),
    }


def engine_key(fields: Mapping[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CacheEntry:
    key: str
    plan: Path
    manifest: Path
    size: int
    last_used: float


class EngineCache:
    """Engines on disk keyed by :func:`engine_key_fields`; see the module docstring."""

    def __init__(self, cache_dir: str | os.PathLike[str], max_bytes: int) -> None:
        self.dir = Path(cache_dir).expanduser()
        self.max_bytes = int(max_bytes)

    @classmethod
    def from_config(cls, config: BuildConfig) -> EngineCache | None:
        if config.engine_cache_dir is None:
            return None
        return cls(config.engine_cache_dir, config.engine_cache_max_bytes)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.plan", self.dir / f"{key}.json"

    def discard(self, fields: Mapping[str, Any], why: str) -> None:
        """Delete the entry for ``fields`` (one warning), e.g. an engine TensorRT cannot deserialize."""
        self._discard(engine_key(fields), why)

    def _discard(self, key: str, why: str) -> None:
        logger.warning("engine cache: discarding entry %s (%s); the engine will be rebuilt", key, why)
        for path in self._paths(key):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def get(self, fields: Mapping[str, Any]) -> bytes | None:
        """The cached engine for ``fields``, or None (a miss, a mismatch or a corrupt entry)."""
        key = engine_key(fields)
        plan_path, manifest_path = self._paths(key)
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            logger.info("engine cache: miss %s", key)
            return None
        except (OSError, ValueError) as exc:
            self._discard(key, f"unreadable manifest: {exc}")
            return None
        try:
            plan = plan_path.read_bytes()
        except OSError as exc:
            self._discard(key, f"unreadable: {exc}")
            return None
        expected = json.loads(json.dumps(dict(fields)))  # the same JSON round trip the manifest took
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("fields") != expected:
            self._discard(key, "its manifest does not match this model, settings, TensorRT or GPU")
            return None
        if len(plan) != manifest.get("engine_bytes") or hashlib.sha256(plan).hexdigest() != manifest.get(
            "engine_sha256"
        ):
            self._discard(key, "the engine file does not match its checksum")
            return None
        try:
            os.utime(manifest_path)  # mark as recently used for the LRU eviction
        except OSError:
            pass
        logger.info("engine cache: hit %s (%.1f MB)", key, len(plan) / 1e6)
        return plan

    def put(self, fields: Mapping[str, Any], engine: bytes) -> Path | None:
        """Store ``engine``; then evict least recently used entries above ``max_bytes``."""
        key = engine_key(fields)
        if len(engine) > self.max_bytes:
            logger.warning(
                "engine cache: the engine (%d bytes) is larger than engine_cache_max_bytes=%d; not cached",
                len(engine),
                self.max_bytes,
            )
            return None
        plan_path, manifest_path = self._paths(key)
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "trtopt_version": __version__,
            "created": time.time(),
            "engine_bytes": len(engine),
            "engine_sha256": hashlib.sha256(engine).hexdigest(),
            "fields": dict(fields),
        }
        atomic_write(plan_path, engine)
        atomic_write(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
        self.evict(keep=key)
        return plan_path

    def entries(self) -> list[CacheEntry]:
        """Complete entries, least recently used first."""
        found = []
        for manifest_path in self.dir.glob("*.json"):
            key = manifest_path.stem
            plan_path = manifest_path.with_suffix(".plan")
            try:
                size = plan_path.stat().st_size + manifest_path.stat().st_size
                last_used = manifest_path.stat().st_mtime
            except FileNotFoundError:
                continue
            found.append(CacheEntry(key, plan_path, manifest_path, size, last_used))
        return sorted(found, key=lambda e: e.last_used)

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete least recently used entries until the cache fits ``max_bytes``; never ``keep``."""
        entries = self.entries()
        total = sum(e.size for e in entries)
        evicted = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if entry.key == keep:
                continue
            for path in (entry.manifest, entry.plan):  # manifest first: the entry vanishes at once
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            total -= entry.size
            evicted.append(entry.key)
        if evicted:
            logger.info(
                "engine cache: evicted %d least recently used entries to stay under %d bytes",
                len(evicted),
                self.max_bytes,
            )
        return evicted
