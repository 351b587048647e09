"""The TensorRT calibration cache: the text format TensorRT 8-10 write and read.

::

    TRT-100300-EntropyCalibration2
    input: 3c010a14
    /conv1/Conv_output_0: 3d8a3b5c

The first line is ``TRT-<version>-<algorithm>``; every other line is
``<tensor name>: <scale>``, the scale (amax / 127) as the 8 hex digits of its
big-endian IEEE float32. ``3b810a13`` is 0.0039380, i.e. amax about 0.5.
trtexec ``--calib``, ModelOpt and TensorRT 10's calibrator interface read and
write this format, so ranges move both ways between trtopt and those tools.

TensorRT has no percentile, MSE or auto calibrator; trtopt writes those caches
with the algorithms ``Percentile<p>Calibration`` (e.g.
``Percentile99.99Calibration``), ``MSECalibration`` and ``AutoCalibration``, so
they are reused only for the same method (and percentile). Hand TensorRT tools
an entropy or minmax cache.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DEFAULT_PERCENTILE, calibrator_name
from ..errors import CalibrationError
from ..files import atomic_write

logger = logging.getLogger(__name__)

# NV_TENSORRT_VERSION of TensorRT 10.3 (major * 10000 + minor * 100 + patch); the header's
# version is informational for the tools that read the cache.
DEFAULT_TRT_VERSION = "100300"
_HEADER = re.compile(r"^TRT-(\d+)-(\w[\w.]*)$")
_ALGORITHMS = {
    "entropy": "EntropyCalibration2",
    "minmax": "MinMaxCalibration",
    "mse": "MSECalibration",  # trtopt's own, like the percentile and auto names
    "auto": "AutoCalibration",
}


def algorithm_name(method: str, percentile: float = DEFAULT_PERCENTILE) -> str:
    """The cache header's algorithm for a trtopt calibration method."""
    method = calibrator_name(method)
    if method == "percentile":
        return f"Percentile{float(percentile):g}Calibration"
    return _ALGORITHMS[method]


def scale_to_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    return struct.unpack(">f", int(text, 16).to_bytes(4, "big"))[0]


@dataclass(frozen=True)
class CalibrationCache:
    """A parsed cache: ``scales`` maps tensor names to amax / 127 (float32 values)."""

    version: str
    algorithm: str  # e.g. "EntropyCalibration2"
    scales: dict[str, float]

    def amax(self) -> dict[str, float]:
        # Exact: a float32 times 127 fits a float64 mantissa, so amax / 127 gives the scale back.
        return {name: scale * 127.0 for name, scale in self.scales.items()}


def read_cache(path: str | os.PathLike[str]) -> CalibrationCache:
    """Parse a TensorRT calibration cache; a file in any other format is a CalibrationError."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration cache {path}: {exc}") from exc
    header = _HEADER.match(lines[0].strip()) if lines else None
    if header is None:
        raise CalibrationError(
            f"{path} is not a TensorRT calibration cache (its first line should look like "
            "'TRT-100300-EntropyCalibration2'); delete it or pass another calibration_cache path"
        )
    scales = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(":")
        value = value.strip()
        if not sep or not name or not re.fullmatch(r"[0-9a-fA-F]{1,8}", value):
            raise CalibrationError(
                f"{path} line {number} is not '<tensor name>: <8 hex digits>' ({line!r}); "
                "the cache is corrupt: delete it to recalibrate"
            )
        scales[name] = hex_to_scale(value)
    return CalibrationCache(header.group(1), header.group(2), scales)


def write_cache(
    path: str | os.PathLike[str],
    scales: Mapping[str, float],
    algorithm: str = "EntropyCalibration2",
    version: str = DEFAULT_TRT_VERSION,
) -> Path:
    """Write ``scales`` (amax / 127 per tensor) as a TensorRT calibration cache, atomically."""
    path = Path(path)
    if not _HEADER.match(f"TRT-{version}-{algorithm}"):
        raise CalibrationError(f"cannot write a cache header from version={version!r}, algorithm={algorithm!r}")
    lines = [f"TRT-{version}-{algorithm}"]
    for name, scale in scales.items():
        if "\n" in name or "\r" in name:
            raise CalibrationError(f"tensor name {name!r} contains a line break; the cache format cannot hold it")
        lines.append(f"{name}: {scale_to_hex(scale)}")
    return atomic_write(path, "\n".join(lines) + "\n")


def channel_path(cache_path: str | os.PathLike[str]) -> Path:
    """Where the per-channel statistics of a cache live: ``<cache>.channels.npz`` beside it.

    TensorRT's format holds one scale per tensor; SmoothQuant needs max |x| per
    channel, so those go to a numpy file that TensorRT tools never read.
    """
    path = Path(cache_path)
    return path.with_name(path.name + ".channels.npz")


def write_channel_max(cache_path: str | os.PathLike[str], channel_max: Mapping[str, np.ndarray]) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(values, dtype=np.float64) for name, values in channel_max.items()})
    return atomic_write(channel_path(cache_path), buffer.getvalue())


def read_channel_max(cache_path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The per-channel statistics beside a cache; empty when there are none or they are unreadable."""
    path = channel_path(cache_path)
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:  # truncated or not an npz: recalibrate
        logger.warning("ignoring unreadable per-channel statistics %s: %s", path, exc)
        return {}
