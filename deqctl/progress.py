"""Progress of long work below the commands (fitting a tokenizer, tokenizing a corpus),
reported to whichever display the running command set up, and to nothing otherwise.

    with progress.shown_by(view):                 # a command: view.update / view.finish
        ...
    with progress.tracked("tokenizing test.txt", total_bytes) as advance:   # the work
        for chunk in chunks:
            advance(len(chunk))

The work never learns what displays it (a live table, a bar on stderr, a log line), and
the display never imports the work: the two meet here, through a context variable.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator, Protocol


class Display(Protocol):
    def update(self, label: str, done: int, total: int | None) -> None:
        """`done` of `total` bytes (None: unknown) of the work named `label`."""

    def finish(self, label: str) -> None:
        """The work named `label` has ended, done or not."""


_display: ContextVar[Display | None] = ContextVar("deqctl_progress", default=None)


class _SideChannel:
    """`display`, until writing to it fails (its reader gone: a closed pipe, a full disk):
    from then on progress is not shown, and the work goes on. Progress is a side channel;
    it must never cost the work or its result."""

    def __init__(self, display: Display):
        self.display: Display | None = display

    def update(self, label: str, done: int, total: int | None) -> None:
        self._show(lambda d: d.update(label, done, total))

    def finish(self, label: str) -> None:
        self._show(lambda d: d.finish(label))

    def _show(self, call: Callable[[Display], None]) -> None:
        if self.display is not None:
            try:
                call(self.display)
            except OSError:
                self.display = None


@contextlib.contextmanager
def shown_by(display: Display | None) -> Iterator[None]:
    """Report the progress of work run inside the block to `display`; the first OSError
    writing it turns progress off for the rest of the block."""
    token = _display.set(None if display is None else _SideChannel(display))
    try:
        yield
    finally:
        _display.reset(token)


@contextlib.contextmanager
def tracked(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`, which counts n more bytes of the work `label` done."""
    display = _display.get()
    if display is None:
        yield lambda n: None
        return
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        display.update(label, done, total)

    display.update(label, 0, total)
    try:
        yield advance
    finally:
        display.finish(label)
