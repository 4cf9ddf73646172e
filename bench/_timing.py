"""Timing primitives of the benchmark: device syncs, a call-counting timer around f, the
time of one f call alone, and progress lines with the time since start."""

from __future__ import annotations

import statistics
import sys
import time

import torch

T0 = time.perf_counter()


def progress(msg: str) -> None:
    print(f"  [{time.perf_counter() - T0:5.0f} s] {msg}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timed:
    """Wraps f: counts calls and, with `clock`, adds up the wall time spent inside it.

    Clocked on CPU only: on CUDA a timer inside f would have to synchronise and so change
    what it measures; there the time in f is estimated as calls x (one f, timed alone).
    """

    def __init__(self, fn, clock: bool):
        self.fn, self.clock = fn, clock
        self.calls, self.time = 0, 0.0

    def __call__(self, *args):
        self.calls += 1
        if not self.clock:
            return self.fn(*args)
        t = time.perf_counter()
        out = self.fn(*args)
        self.time += time.perf_counter() - t
        return out


def time_f_alone(f, z: torch.Tensor, device: str, n: int = 5) -> float:
    """Median seconds of one f call, measured in a tight loop."""
    with torch.no_grad():
        f(z)
        times = []
        for _ in range(n):
            sync(device)
            t = time.perf_counter()
            f(z)
            sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times)
