"""TensorRT's logger, bridged into Python logging; shared by the builder and the runtime.

TensorRT keeps the first ``ILogger`` it is given for the whole process, so the
builder and the runtime must hand it the same one (``tensorrt_logger``). The
bridge also remembers the errors TensorRT logged, so a failed build or
deserialization can say why (``ErrorLog``, ``format_errors``).

The ``trt.ILogger`` subclass is created inside a factory function, so
importing trtopt never needs TensorRT.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

# TensorRT's own messages go to their own logger, so users can silence or raise them separately.
trt_logger = logging.getLogger("trtopt.tensorrt")

VERBOSE = 5  # below DEBUG: TensorRT's VERBOSE stream is thousands of lines per build
_SEVERITY_TO_LEVEL = {
    "INTERNAL_ERROR": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.DEBUG,  # TensorRT's INFO is build chatter; trtopt's INFO is for the user
    "VERBOSE": VERBOSE,
}


class ErrorLog:
    """The error messages TensorRT logged: the last few always, and per thread inside ``capture()``.

    Kept apart from the ``trt.ILogger`` subclass so that subclass holds only
    TensorRT's own callback.
    """

    def __init__(self, keep: int = 20) -> None:
        self.recent: deque[str] = deque(maxlen=keep)
        self._local = threading.local()

    def record(self, text: str) -> None:
        self.recent.append(text)
        captured = getattr(self._local, "errors", None)
        if captured is not None:
            captured.append(text)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Collect the error messages this thread's TensorRT calls log inside the block."""
        errors: list[str] = []
        previous = getattr(self._local, "errors", None)
        self._local.errors = errors
        try:
            yield errors
        finally:
            self._local.errors = previous


def make_logger(trt: ModuleType) -> Any:
    """Create a ``trt.ILogger`` that forwards TensorRT's messages to Python logging.

    TensorRT calls ``log`` from C++; an exception escaping it would cross into
    TensorRT, so the callback swallows everything. Messages of severity ERROR
    and above also go to the logger's ``errors`` (an ``ErrorLog``), so a failed
    build or deserialization can say why.
    """

    # trt is the tensorrt module, passed in (it has no stubs): mypy cannot resolve a base class read from it.
    class TensorRTLogBridge(trt.ILogger):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors = ErrorLog()

        def log(self, severity: Any, msg: str) -> None:
            try:
                level = _SEVERITY_TO_LEVEL.get(getattr(severity, "name", ""), logging.WARNING)
                text = str(msg)
                if level >= logging.ERROR:
                    self.errors.record(text)
                if trt_logger.isEnabledFor(level):
                    trt_logger.log(level, "%s", text)
            except BaseException:  # noqa: BLE001 - nothing may propagate into TensorRT's C++
                pass

    return TensorRTLogBridge()


@functools.lru_cache(maxsize=None)
def tensorrt_logger(trt: ModuleType) -> Any:
    """The process's one logger bridge: TensorRT keeps the first logger it is given
    for the whole process (and warns when a later builder or runtime gets another)."""
    return make_logger(trt)


def format_errors(errors: Sequence[str], fallback: Sequence[str] = ()) -> str:
    lines = list(errors) or list(fallback)
    if not lines:
        return "TensorRT logged no error; set logging.getLogger('trtopt.tensorrt') to DEBUG to see its full log"
    return "TensorRT said:\n  " + "\n  ".join(lines)
