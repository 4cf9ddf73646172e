"""Stopping on a signal: SIGINT (Ctrl-C) and SIGTERM (Slurm, `timeout`, docker stop,
Kubernetes) ask training to stop after the current step, or an evaluation at its next
batch; a second signal aborts at once, leaving the last complete checkpoint."""

from __future__ import annotations

import signal
from typing import Any


class EvalStopped(Exception):
    """A signal arrived during an evaluation, which stops at the next batch."""


class StopOnSignal:
    """While active (a `with` block in the main thread), records the first SIGINT or
    SIGTERM in `signum`; the second one aborts (KeyboardInterrupt, or SystemExit 143)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopOnSignal":
        def handler(signum, frame):
            if self.requested:     # abort now: the last complete checkpoint stays
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            self.signum = signum
        try:
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, handler)
        except ValueError:         # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def check(self) -> None:
        """Raise EvalStopped once a signal has arrived (an evaluation's per-batch check)."""
        if self.requested:
            raise EvalStopped
