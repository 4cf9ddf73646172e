"""Peak memory growth of a stretch of work: what every metrics row reports as
`peak_mem_mb` (training only: evaluations are paused out), and what the benchmarks measure.

CUDA: growth of torch.cuda.max_memory_allocated over the allocation at the start.
CPU (Linux): peak resident memory (VmHWM) minus the resident memory at the start, the
high-water mark reset at the start (/proc/self/clear_refs) so earlier peaks (data
loading) do not hide the work's own; elsewhere the growth of the process's peak RSS.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys

import torch


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Hand the heap glibc keeps after frees back to the system (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _maxrss_kb() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss   # bytes on macOS, KiB elsewhere


class PeakMemory:
    """Starts measuring when created; `peak_mb()` is the growth of the peak since then."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.carried = 0.0                        # the peak of the stretches before a pause
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.how, self.base = "cuda max_memory_allocated", torch.cuda.memory_allocated()
            return
        if self._reset_cpu_peak():
            self.how, self.base = "VmHWM after clear_refs", _status_kb("VmRSS")
        else:
            self.base = _status_kb("VmHWM")
            self.how = "VmHWM growth"
        if self.base is None:                     # no /proc: the peak RSS rusage reports
            self.how, self.base = "ru_maxrss growth", _maxrss_kb()

    @staticmethod
    def _reset_cpu_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")   # reset VmHWM to the current RSS
            return True
        except OSError:
            return False

    def peak_mb(self) -> float:
        """Peak memory growth since creation, pauses excluded, in MiB (a CUDA sync point)."""
        if self.cuda:
            torch.cuda.synchronize()
            now = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            kb = _maxrss_kb() if self.how == "ru_maxrss growth" else _status_kb("VmHWM")
            now = max(kb - self.base, 0) / 1024
        return max(now, self.carried)

    @contextlib.contextmanager
    def paused(self):
        """Leave the work inside (an evaluation) out of the peak, where the high-water mark
        can be reset (CUDA; Linux); elsewhere the peak still includes it."""
        self.carried = self.peak_mb()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            elif self.how == "VmHWM after clear_refs":
                _trim_heap()   # what the pause freed would otherwise stay resident
                self._reset_cpu_peak()
