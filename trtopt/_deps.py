"""The only module that imports ``tensorrt`` and ``pycuda``.

Everything else asks here, so importing trtopt never needs TensorRT or a GPU,
and the reason a GPU path is unavailable is worded in one place.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

from .errors import DependencyError

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
    from .builder import builder_unavailable_reason

    return builder_unavailable_reason(trt)


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
