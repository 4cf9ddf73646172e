"""Peak memory growth of one call, as the benchmark reports it.

CPU: peak RSS (VmHWM) during the call minus RSS before it; the high-water mark is reset
just before the call (/proc/self/clear_refs), falling back to HWM before/after where the
kernel does not allow that. CUDA: torch.cuda.max_memory_allocated growth.
Run it in a fresh process: RSS is per process, and a process's earlier peaks linger.
"""

from __future__ import annotations

from typing import Callable

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_growth_mb(step: Callable[[], object], device: str) -> tuple[float, str, object]:
    """Run `step()`; return (peak memory growth in MB, how it was measured, step's result)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, \
            "cuda max_memory_allocated", result
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")   # reset VmHWM to the current RSS
        how, before = "VmHWM after clear_refs", _status_kb("VmRSS")
    except OSError:
        how, before = "VmHWM before/after", _status_kb("VmHWM")
    result = step()
    return (_status_kb("VmHWM") - before) / 1024, how, result
