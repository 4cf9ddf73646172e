"""Peak memory growth of one call, as the benchmark reports it (deqctl.engine.memory does
the measuring: CPU VmHWM growth after a reset, CUDA max_memory_allocated growth).
Run it in a fresh process: RSS is per process, and a process's earlier peaks linger.
"""

from __future__ import annotations

from typing import Callable

from deqctl.engine.memory import PeakMemory


def peak_growth_mb(step: Callable[[], object], device: str) -> tuple[float, str, object]:
    """Run `step()`; return (peak memory growth in MB, how it was measured, step's result)."""
    mem = PeakMemory(device)
    result = step()
    return mem.peak_mb(), mem.how, result
