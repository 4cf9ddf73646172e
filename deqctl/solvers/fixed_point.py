"""Damped fixed-point iteration: z <- z + damping * (f(z) - z)."""

from __future__ import annotations

import torch

from .tracker import Tracker


def fixed_point(tr: Tracker, z: torch.Tensor, *, damping: float = 1.0) -> None:
    """Iterate until the tracker says stop; results live in the tracker."""
    while True:
        fz, g = tr.evaluate(z)
        if tr.finished():
            return
        z = tr.freeze(fz if damping == 1.0 else z + damping * g, z)
        (z,) = tr.compact_state(z)
