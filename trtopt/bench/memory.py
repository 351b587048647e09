"""Peak memory of a measured window: resident set size (and torch's CUDA allocator) while calls run."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryUsage:
    peak_rss_bytes: int | None
    rss_scope: str  # "window": peak of the measured window; "process": since the process started
    start_rss_bytes: int | None = None  # RSS when the window opened ("window" scope only)
    peak_cuda_bytes: int | None = None  # torch's allocator only

    @property
    def growth_bytes(self) -> int | None:
        """How far RSS rose above its level at the start of the window: what the calls needed."""
        if self.peak_rss_bytes is None or self.start_rss_bytes is None:
            return None
        return self.peak_rss_bytes - self.start_rss_bytes


def _read_status(field_name: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return None


class PeakMemory:
    """Context manager that records peak memory inside its ``with`` block (see module docstring)."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda and torch.cuda.is_available()
        self.usage: MemoryUsage | None = None
        self._scope = "process"
        self._start: int | None = None

    def __enter__(self) -> PeakMemory:
        try:
            # Writing "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self._scope = "window"
            self._start = _read_status("VmRSS")
        except OSError:
            self._scope = "process"
            self._start = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        rss = _read_status("VmHWM") if self._scope == "window" else None
        if rss is None:
            self._scope, self._start = "process", None
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss = maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, kB on Linux
        cuda_peak = int(torch.cuda.max_memory_allocated()) if self.cuda else None
        self.usage = MemoryUsage(
            peak_rss_bytes=int(rss), rss_scope=self._scope, start_rss_bytes=self._start, peak_cuda_bytes=cuda_peak
        )


def most_demanding(a: MemoryUsage | None, b: MemoryUsage | None) -> MemoryUsage | None:
    """The window with the larger growth (else the larger peak): the most demanding batch size."""
    if a is None or b is None:
        return b or a
    key = (lambda m: m.growth_bytes) if a.growth_bytes is not None and b.growth_bytes is not None else (
        lambda m: m.peak_rss_bytes or 0
    )
    return a if key(a) >= key(b) else b
