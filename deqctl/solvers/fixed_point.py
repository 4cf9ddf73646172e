"""Damped fixed-point iteration: z <- z + damping * (f(z) - z)."""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Interval

from .registry import SOLVERS
from .tracker import Tracker


@SOLVERS.register("fixed_point")
def fixed_point(tr: Tracker, z: torch.Tensor, *,
                damping: Annotated[float, Interval(gt=0, le=1)] = 1.0) -> None:
    """Iterate until the tracker says stop; results live in the tracker."""
    while True:
        fz, g = tr.evaluate(z)
        if tr.finished():
            return
        z = tr.freeze(fz if damping == 1.0 else z + damping * g, z)
        (z,) = tr.compact_state(z)
