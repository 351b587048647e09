"""The only module that imports ``tensorrt`` and ``pycuda``.

Everything else asks here, so importing trtopt never needs TensorRT or a GPU,
and the reason a GPU path is unavailable is worded in one place (down to
whether TensorRT can create a builder: ``create_builder``).
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType
from typing import Any

from .errors import DependencyError, first_line
from .backends.tensorrt.trt_logging import format_errors, tensorrt_logger

logger = logging.getLogger(__name__)

GPU_INSTALL_HINT = (
    'install the GPU extra for your driver\'s CUDA major version (`nvidia-smi` shows it): '
    '`pip install "trtopt[gpu-cu12]"` or `pip install "trtopt[gpu-cu13]"` (TensorRT and pycuda), '
    "on a machine with an NVIDIA GPU and driver"
)


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything
        logger.debug("cannot import %s: %s", name, exc)
        return None


@functools.lru_cache(maxsize=None)
def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT backend cannot run here, or None when it can."""
    trt = _import("tensorrt")
    if trt is None:
        return "the tensorrt package is not installed"
    cuda = _import("pycuda.driver")
    if cuda is None:
        return "the pycuda package is not installed"
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device is visible"
    except Exception as exc:  # pycuda raises its own LogicError/RuntimeError family
        return f"the CUDA driver is not usable ({exc})"
    # Importing is not running: a driver too old for this TensorRT fails only here.
    return builder_unavailable_reason(trt)


def create_builder(trt: ModuleType) -> tuple[Any, list[str]]:
    """``trt.Builder`` and the errors TensorRT logged creating it; the builder is None on failure."""
    bridge = tensorrt_logger(trt)
    with bridge.errors.capture() as errors:
        try:
            builder = trt.Builder(bridge)
        except Exception as exc:  # noqa: BLE001 - the bindings raise when the C++ factory returns null
            errors.append(first_line(exc))
            builder = None
    return builder, list(errors)


def builder_unavailable_reason(trt: ModuleType) -> str | None:
    """Why ``trt.Builder`` cannot be created here, or None when it can.

    TensorRT imports even where it cannot run: with a driver older than its
    CUDA version (the CUDA 13 build needs an r580+ driver) the failure comes
    only when a builder is created. ``backend="auto"`` and the GPU tests probe
    this so they fall back or skip instead of failing in the build.
    """
    builder, errors = create_builder(trt)
    if builder is not None:
        return None
    return (
        f"TensorRT {getattr(trt, '__version__', '?')} cannot create a builder (often: the NVIDIA "
        "driver is too old for this TensorRT's CUDA version; install the trtopt extra for your "
        "driver's CUDA major version). " + format_errors(errors)
    )


def tensorrt() -> ModuleType:
    """Return the ``tensorrt`` module or raise a DependencyError saying what to install."""
    module = _import("tensorrt")
    if module is None:
        raise DependencyError(f"TensorRT is not installed: {GPU_INSTALL_HINT}")
    return module


def cuda() -> ModuleType:
    """Return ``pycuda.driver`` with the driver initialised (no context is created here)."""
    module = _import("pycuda.driver")
    if module is None:
        raise DependencyError(f"pycuda is not installed: {GPU_INSTALL_HINT}")
    module.init()
    return module


def require_tensorrt_backend() -> None:
    """Raise a DependencyError when the TensorRT backend cannot run on this machine."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise DependencyError(f"backend='tensorrt' cannot run: {reason}; {GPU_INSTALL_HINT}")
