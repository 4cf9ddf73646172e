"""Loss spikes: how unstable training was, measured rather than asserted. A spike is a
training step whose loss exceeds SPIKE_FACTOR times the median loss of the SPIKE_WINDOW
steps before it (Jacobian regularisation, Bai et al. 2021, reports DEQ training that
blows up this way; the median ignores the spikes themselves)."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Iterable

SPIKE_FACTOR, SPIKE_WINDOW = 3.0, 50


class LossSpikes:
    """Counts spikes over the step losses it is shown, in order; `history` (the last
    SPIKE_WINDOW finite losses) is what a checkpoint keeps so a resumed run counts the
    same spikes."""

    def __init__(self, history: Iterable[float] = ()):
        self.history: deque[float] = deque(history, maxlen=SPIKE_WINDOW)

    def count(self, losses: Iterable[float]) -> int:
        """The spikes among `losses` (non-finite ones are divergence, not spikes)."""
        spikes = 0
        for v in losses:
            if not math.isfinite(v):
                continue
            if self.history and v > SPIKE_FACTOR * statistics.median(self.history):
                spikes += 1
            self.history.append(v)
        return spikes
