"""Benchmark results and their JSON form: one ``BenchResult`` per row, a ``BenchReport`` per run, with the environment it ran in."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import onnxruntime

from ..files import atomic_write
from .._version import __version__
from ..errors import ConfigError
from .compare import Accuracy
from .memory import MemoryUsage
from .stats import PERCENTILE_METHOD, LatencyStats
from .tables import markdown_table

SCHEMA = "trtopt-bench"
SCHEMA_VERSION = 1



def write_results(out_dir: str | os.PathLike[str], stem: str, result: Mapping[str, Any], table: str) -> None:
    """A benchmark script's result as ``<stem>.json`` and its markdown ``table`` as ``<stem>.md``
    in ``out_dir`` (both written atomically); the table is printed too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.json", json.dumps(result, indent=1))
    atomic_write(out / f"{stem}.md", table)
    print(table)

@dataclass
class BenchResult:
    """One row: a model run one way (torch eager, or trtopt at one precision on one backend)."""

    model: str
    runtime: str  # "torch-eager" or "trtopt"
    precision: str
    backend: str  # "torch", "onnxruntime" or "tensorrt"
    device: str
    status: str = "ok"  # "ok", "skipped" (cannot run here / not available) or "failed"
    reason: str | None = None
    compile_time_s: float | None = None
    artifact_bytes: int | None = None  # size of the saved .trtopt file
    memory: MemoryUsage | None = None
    latency: list[LatencyStats] = field(default_factory=list)
    accuracy: Accuracy | None = None
    threads: int | None = None  # intra-op CPU threads it was timed with (torch's and ONNX Runtime's alike)

    def latency_at(self, batch_size: int) -> LatencyStats | None:
        return next((s for s in self.latency if s.batch_size == batch_size), None)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchResult:
        values = dict(data)
        values["memory"] = MemoryUsage(**values["memory"]) if values.get("memory") else None
        values["latency"] = [LatencyStats(**s) for s in values.get("latency", [])]
        values["accuracy"] = Accuracy(**values["accuracy"]) if values.get("accuracy") else None
        return cls(**values)


def device_name() -> str:
    """A readable name for where torch runs work by default here."""
    if torch.cuda.is_available():
        return f"cuda:0 ({torch.cuda.get_device_name(0)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment() -> dict[str, Any]:
    """Versions and hardware, so that a result file says where it was measured."""
    return {
        "trtopt": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "cpu_count": os.cpu_count(),
        "device": device_name(),
    }


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


@dataclass
class BenchReport:
    """A benchmark run: settings, environment and one ``BenchResult`` per row."""

    results: list[BenchResult]
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=environment)
    created_utc: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )

    def to_json(self) -> dict[str, Any]:
        return _finite(
            {
                "schema": SCHEMA,
                "schema_version": SCHEMA_VERSION,
                "percentile_method": PERCENTILE_METHOD,
                **dataclasses.asdict(self),
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchReport:
        if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(
                f"not a {SCHEMA} v{SCHEMA_VERSION} result (schema {data.get('schema')!r} "
                f"v{data.get('schema_version')!r}); rerun the benchmark with this trtopt"
            )
        return cls(
            results=[BenchResult.from_json(r) for r in data["results"]],
            settings=dict(data.get("settings", {})),
            environment=dict(data.get("environment", {})),
            created_utc=data.get("created_utc", ""),
        )

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write(path, json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")

    def markdown(self) -> str:
        return markdown_table(self)
