"""Live training view: a Rich table + progress bar on a terminal, plain lines otherwise.

The engine hands every logged step / evaluation result (a metrics.jsonl row) to
``TrainView.log``; this module only formats, it never computes metrics.
"""

from __future__ import annotations

import math
from collections import deque
from types import TracebackType
from typing import Any, Mapping, Sequence

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ..keys import K
from ..tasks.base import Metric, Task
from .work import WorkBars
from ..numbers import number
from .fmt import (MISSING, nonfinite_name, fmt_fixed, fmt_float, fmt_int, fmt_ms, fmt_pair,
                  fmt_pct, fmt_sci)

# Styles in one place so the table and tests agree on what "highlighted" means.
STYLE_BAD = "bold red"  # residual above tolerance, non-finite values
STYLE_WARN = "yellow"  # partial convergence, LS fallbacks
STYLE_EVAL = "bold cyan"  # evaluation rows

Row = Mapping[str, Any]


# --------------------------------------------------------------------------- row checks


def _above(v: Any, tol: float) -> bool:
    """Return True when ``v`` exceeds ``tol``; NaN counts as above (it never converged)."""
    x = number(v)
    return x is not None and (math.isnan(x) or x > tol)


def _fwd_residual(row: Row, stop_mode: str) -> tuple[Any, Any, str]:
    """Return (mean, max, label) of the forward residual that the tolerance applies to."""
    if stop_mode == "abs":
        return row.get(K.fwd_abs_residual), row.get(K.fwd_abs_residual_max), "abs"
    return row.get(K.fwd_rel_residual), row.get(K.fwd_rel_residual_max), "rel"


def _fwd_flagged(row: Row, fwd_tol: float, stop_mode: str) -> bool:
    """Return True when the worst forward residual in the batch is above the tolerance."""
    mean, mx, _ = _fwd_residual(row, stop_mode)
    # The max is what the tolerance is about; fall back to the mean when only that was logged.
    return _above(mx if number(mx) is not None else mean, fwd_tol)


def _is_eval(row: Row) -> bool:
    """Return True for evaluation rows (split "val"/"test")."""
    return row.get(K.split, "train") not in (None, "train")


def _step_label(row: Row) -> str:
    """Return "120" for training rows and "test@120" for evaluation rows."""
    step = fmt_int(row.get(K.step))
    return f"{row[K.split]}@{step}" if _is_eval(row) else step


def _notes(row: Row, labelled: bool = False) -> str:
    """Return the short solver-health note: stop reason, LS fallbacks, non-finite count.

    ``labelled`` prefixes the stop reason with "stop" so a plain line never reads "... conv".
    """
    parts = []
    if row.get(K.fwd_stop):
        parts.append(f"stop {row[K.fwd_stop]}" if labelled else str(row[K.fwd_stop]))
    if (number(row.get(K.fallbacks)) or 0) > 0:
        parts.append(f"fallbacks {fmt_int(row[K.fallbacks])}" if labelled else f"fb {fmt_int(row[K.fallbacks])}")
    if (number(row.get(K.nonfinite)) or 0) > 0:
        parts.append(f"nonfinite {fmt_int(row[K.nonfinite])}")
    return " ".join(parts) or MISSING


# --------------------------------------------------------------------------- table and line

SOLVER_COLUMNS = ["lr", "fwd NFE", "fwd res", "conv", "bwd NFE", "bwd res", "ms/step",
                  "samp/s", "notes"]


def columns(metrics: Sequence[Metric] = ()) -> list[str]:
    """Column headers: step, epoch, loss, the task's table metrics, the solver columns."""
    return ["step", "epoch", "loss", *(m.label for m in metrics if m.column), *SOLVER_COLUMNS]


def row_cells(row: Row, *, fwd_tol: float, bwd_tol: float, stop_mode: str = "rel",
              metrics: Sequence[Metric] = ()) -> list[Text]:
    """Return the styled table cells of one row, in ``columns(metrics)`` order."""
    fwd_mean, fwd_max, _ = _fwd_residual(row, stop_mode)
    conv = number(row.get(K.fwd_converged))
    nonfinite = (number(row.get(K.nonfinite)) or 0) > 0
    notes_style = STYLE_BAD if nonfinite or row.get(K.fwd_stop) == "nonfinite" else (
        STYLE_WARN if (number(row.get(K.fallbacks)) or 0) > 0 else "")
    loss = number(row.get(K.loss))
    return [
        Text(_step_label(row)),
        Text(fmt_fixed(row.get(K.epoch), 2)),
        Text(fmt_float(row.get(K.loss)), style=STYLE_BAD if loss is not None and nonfinite_name(loss) else ""),
        *(Text(m.fmt(row.get(m.key))) for m in metrics if m.column),
        Text(fmt_sci(row.get(K.lr))),
        Text(fmt_pair(row.get(K.fwd_nfe), row.get(K.fwd_nfe_max), fmt_fixed, fmt_int)),
        Text(fmt_pair(fwd_mean, fwd_max, fmt_sci, fmt_sci),
             style=STYLE_BAD if _fwd_flagged(row, fwd_tol, stop_mode) else ""),
        Text(fmt_pct(conv), style=STYLE_WARN if conv is not None and not conv >= 1.0 else ""),
        Text(fmt_fixed(row.get(K.bwd_nfe))),
        Text(fmt_sci(row.get(K.bwd_rel_residual)),
             style=STYLE_BAD if _above(row.get(K.bwd_rel_residual), bwd_tol) else ""),
        Text(fmt_ms(row.get(K.step_time_s))),
        Text(fmt_int(row.get(K.samples_per_s))),
        Text(_notes(row), style=notes_style),
    ]


def build_table(rows: list[Row], *, fwd_tol: float, bwd_tol: float, stop_mode: str = "rel",
                title: str = "", metrics: Sequence[Metric] = ()) -> Table:
    """Return a Rich table of ``rows`` (already bounded by the caller), evaluation rows in bold."""
    res_label = "abs" if stop_mode == "abs" else "rel"
    table = Table(title=title or None,
                  caption=f"fwd tol {fwd_tol:.0e} ({res_label}) · bwd tol {bwd_tol:.0e}",
                  expand=False)
    for c in columns(metrics):
        h = f"fwd {res_label} res" if c == "fwd res" else c
        table.add_column(h, justify="left" if h in ("step", "notes") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*row_cells(r, fwd_tol=fwd_tol, bwd_tol=bwd_tol, stop_mode=stop_mode,
                                 metrics=metrics),
                      style=STYLE_EVAL if _is_eval(r) else None)
    return table


def plain_line(row: Row, stop_mode: str = "rel", metrics: Sequence[Metric] = ()) -> str:
    """Return the one-line text form of a row, e.g. "step 120 ep 1 loss 0.3412 acc 91.2% ...".

    A group of fields is left out when every value in it is missing (evaluation rows have no
    lr or backward stats); a single missing value inside a group prints as "-".
    """
    def present(*keys: str) -> bool:
        return any(number(row.get(k)) is not None for k in keys)

    fwd_mean, fwd_max, label = _fwd_residual(row, stop_mode)
    res_keys = (K.fwd_abs_residual, K.fwd_abs_residual_max) if label == "abs" else (
        K.fwd_rel_residual, K.fwd_rel_residual_max)
    parts = [f"{row[K.split]} " if _is_eval(row) else ""]
    parts[0] += f"step {fmt_int(row.get(K.step))} ep {fmt_fixed(row.get(K.epoch), 2)}"
    if present(K.loss):
        parts.append(f"loss {fmt_float(row.get(K.loss))}")
    parts += [f"{m.label} {m.fmt(row.get(m.key))}" for m in metrics if present(m.key)]
    if present(K.lr):
        parts.append(f"lr {fmt_sci(row.get(K.lr))}")
    if present(K.fwd_nfe, K.fwd_nfe_max, K.fwd_converged, *res_keys):
        parts.append(
            f"fwd nfe {fmt_pair(row.get(K.fwd_nfe), row.get(K.fwd_nfe_max), fmt_fixed, fmt_int)}"
            f" {label} {fmt_pair(fwd_mean, fwd_max, fmt_sci, fmt_sci)}"
            f" conv {fmt_pct(row.get(K.fwd_converged))}")
    if present(K.bwd_nfe, K.bwd_rel_residual):
        parts.append(f"bwd nfe {fmt_fixed(row.get(K.bwd_nfe))} rel {fmt_sci(row.get(K.bwd_rel_residual))}")
    if present(K.step_time_s):
        parts.append(f"{fmt_ms(row.get(K.step_time_s))} ms/step")
    if present(K.samples_per_s):
        parts.append(f"{fmt_int(row.get(K.samples_per_s))} samp/s")
    notes = _notes(row, labelled=True)
    if notes != MISSING:
        parts.append(notes)
    return " ".join(parts)


# --------------------------------------------------------------------------- the view


class TrainView:
    """Context manager that shows training progress: Rich Live on a terminal, plain lines otherwise."""

    def __init__(self, total_steps: int | None, *, fwd_tol: float, bwd_tol: float, stop_mode: str = "rel",
                 title: str = "", console: Console | None = None, plain: bool | None = None,
                 max_rows: int = 12) -> None:
        self.console = console if console is not None else Console()
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self.total_steps = total_steps
        self.fwd_tol, self.bwd_tol, self.stop_mode = fwd_tol, bwd_tol, stop_mode
        self.title = title
        self.task: Task | None = None
        self.rows: deque[Row] = deque(maxlen=max_rows)
        self._live: Live | None = None
        self._table = self.table()
        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=self.console)
        self._task: TaskID = self._progress.add_task("train", total=total_steps, start=False)
        self.work = WorkBars(self.console, self.plain, self.event)   # data work (tokenizing)

    def __enter__(self) -> "TrainView":
        if not self.plain:
            # start_task resets the clock so "elapsed" counts from here, not from __init__.
            self._progress.start_task(self._task)
            self._live = Live(self, console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.refresh()  # final state (last rows, last step) stays on screen
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def __rich__(self) -> RenderableType:
        """What the Live shows on each refresh: the table above the data-work bars and the
        progress bar. The table is rebuilt in log(), never per refresh."""
        return Group(self._table, self.work, self._progress)

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return self.task.metrics if self.task is not None else ()

    def table(self) -> Table:
        """Return a freshly built table of the last ``max_rows`` logged rows."""
        return build_table(list(self.rows), fwd_tol=self.fwd_tol, bwd_tol=self.bwd_tol,
                           stop_mode=self.stop_mode, title=self.title, metrics=self.metrics)

    def set_task(self, task: Task) -> None:
        """Show `task`'s metrics, once the data (and so the task) is known."""
        self.task = task
        self._table = self.table()

    def log(self, row: Row) -> None:
        """Show one logged training step or evaluation result; returns nothing."""
        if self.plain:
            self._out(plain_line(row, self.stop_mode, self.metrics))
            return
        self.rows.append(dict(row))
        self._table = self.table()  # the Live picks it up on its next auto-refresh
        if _is_eval(row) and any(not m.column for m in self.metrics):
            # metrics too many for the table (forecast baselines) go above it
            self.event(f"{row[K.split]} @ step {fmt_int(row.get(K.step))}: {self.task.summary(row)}")

    def event(self, text: str) -> None:
        """Print a message above the live table (or as a plain line); returns nothing."""
        if self.plain:
            self._out(text)
        elif self._live is not None:
            self._live.console.print(text, markup=False)  # paths may contain "[...]"
        else:
            self.console.print(text, markup=False, soft_wrap=True)

    def set_total(self, total_steps: int) -> None:
        """Set the number of steps, once the data (and so the epoch length) is known."""
        self.total_steps = total_steps
        self._progress.update(self._task, total=total_steps)

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step`` steps done; cheap, drawn on the next refresh."""
        if not self.plain:
            self._progress.update(self._task, completed=step)

    def _out(self, line: str) -> None:
        # Console.out skips markup, highlighting and wrapping: no ANSI codes even if forced.
        self.console.out(line, highlight=False)
