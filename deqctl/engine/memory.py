"""Peak memory growth of a stretch of work: what every metrics row reports as
`peak_mem_mb`, and what the benchmarks measure.

CUDA: growth of torch.cuda.max_memory_allocated over the allocation at the start.
CPU (Linux): peak resident memory (VmHWM) minus the resident memory at the start, the
high-water mark reset at the start (/proc/self/clear_refs) so earlier peaks (data
loading) do not hide the work's own; elsewhere the growth of the process's peak RSS.
"""

from __future__ import annotations

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


def _maxrss_kb() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss   # bytes on macOS, KiB elsewhere


class PeakMemory:
    """Starts measuring when created; `peak_mb()` is the growth of the peak since then."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.how, self.base = "cuda max_memory_allocated", torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")   # reset VmHWM to the current RSS
            self.how, self.base = "VmHWM after clear_refs", _status_kb("VmRSS")
        except OSError:
            self.base = _status_kb("VmHWM")
            self.how = "VmHWM growth"
        if self.base is None:                     # no /proc: the peak RSS rusage reports
            self.how, self.base = "ru_maxrss growth", _maxrss_kb()

    def peak_mb(self) -> float:
        """Peak memory growth since creation, in MiB (a CUDA sync point)."""
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        now = _maxrss_kb() if self.how == "ru_maxrss growth" else _status_kb("VmHWM")
        return max(now - self.base, 0) / 1024
