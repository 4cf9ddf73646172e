"""How long data work shows (fitting a tokenizer, tokenizing a corpus): a bar per piece
of work on a terminal, in the live view or on its own; elsewhere (a log file, a batch
job) one line when a piece starts and one every PLAIN_EVERY_S seconds after. It is the
`deqctl.progress.Display` the commands set up."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from rich.console import Console, RenderableType
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

from .. import progress

PLAIN_EVERY_S = 30.0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class WorkBars:
    """A `progress.Display`: bars on a terminal, otherwise lines through `say`."""

    def __init__(self, console: Console, plain: bool, say: Callable[[str], None]):
        self.plain, self.say = plain, say
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeElapsedColumn(), TextColumn("eta"),
                             TimeRemainingColumn(), console=console)
        self._tasks: dict[str, TaskID] = {}
        self._said: dict[str, float] = {}

    def update(self, label: str, done: int, total: int | None) -> None:
        if self.plain:
            now = time.monotonic()
            if now - self._said.get(label, -PLAIN_EVERY_S) >= PLAIN_EVERY_S:
                self._said[label] = now
                if done:
                    self.say(f"{label}: {_size(done)}" + (f" of {_size(total)}" if total else ""))
                else:
                    self.say(f"{label} ({_size(total) if total else 'size unknown'})")
            return
        if label not in self._tasks:
            self._tasks[label] = self.bars.add_task(label, total=total)
        self.bars.update(self._tasks[label], completed=done, total=total)

    def finish(self, label: str) -> None:
        self._said.pop(label, None)
        if label in self._tasks:
            self.bars.remove_task(self._tasks.pop(label))

    def __rich__(self) -> RenderableType:
        return self.bars.get_renderable()


def _say(console: Console, line: str) -> None:
    """`line` straight to the console's file: a reader that has gone raises the
    BrokenPipeError that `progress` turns into no more progress, where Rich's console
    would end the process (and send stdout, the command's result, to /dev/null)."""
    console.file.write(line + "\n")
    console.file.flush()


@contextlib.contextmanager
def work_shown_on(console: Console) -> Iterator[None]:
    """Show the progress of data work inside the block on `console` (e.g. stderr) for a
    command that has no live view of its own."""
    bars = WorkBars(console, plain=not console.is_terminal, say=lambda line: _say(console, line))
    with (bars.bars if console.is_terminal else contextlib.nullcontext()), \
            progress.shown_by(bars):
        yield
