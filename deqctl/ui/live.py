"""Live training view: a Rich table + progress bar on a terminal, plain lines otherwise.

The engine hands every logged step / evaluation result (a metrics.jsonl row) to
``TrainView.log``; this module only formats, it never computes metrics.
"""

from __future__ import annotations

import math
from collections import deque
from types import TracebackType
from typing import Any, Callable, Mapping

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

MISSING = "-"

# Styles in one place so the table and tests agree on what "highlighted" means.
STYLE_BAD = "bold red"  # residual above tolerance, non-finite values
STYLE_WARN = "yellow"  # partial convergence, LS fallbacks
STYLE_EVAL = "bold cyan"  # evaluation rows

Row = Mapping[str, Any]


# --------------------------------------------------------------------------- number formats


def _num(v: Any) -> float | None:
    """Return ``v`` as a float, or None when it is missing or not a number."""
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _nonfinite(x: float) -> str | None:
    """Return "nan"/"inf"/"-inf" for non-finite ``x``, else None."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None


def _fmt(v: Any, spec: str) -> str:
    """Return ``v`` formatted with ``spec``, "inf"/"nan" as words, or "-" when missing."""
    x = _num(v)
    if x is None:
        return MISSING
    return _nonfinite(x) or format(x, spec)


def fmt_int(v: Any) -> str:
    """Return ``v`` rounded to an integer ("120"), or "-"."""
    return _fmt(v, ".0f")


def fmt_float(v: Any, digits: int = 4) -> str:
    """Return ``v`` with ``digits`` significant digits ("0.3412"), or "-"."""
    return _fmt(v, f".{digits}g")


def fmt_fixed(v: Any, decimals: int = 1) -> str:
    """Return ``v`` with a fixed number of decimals ("9.4"), or "-"."""
    return _fmt(v, f".{decimals}f")


def fmt_sci(v: Any, digits: int = 1) -> str:
    """Return ``v`` in scientific notation ("3.1e-04"), or "-"."""
    return _fmt(v, f".{digits}e")


def fmt_pct(v: Any) -> str:
    """Return a fraction 0..1 as a percentage ("91.2%", exactly 1 -> "100%"), or "-"."""
    x = _num(v)
    if x is None:
        return MISSING
    bad = _nonfinite(x)
    if bad:
        return bad
    if x == 1.0:
        return "100%"
    # 0.9996 must not print as "100.0%": that would hide the one sample that failed.
    pct = min(x * 100.0, 99.9) if x < 1.0 else x * 100.0
    return f"{pct:.1f}%"


def fmt_ms(seconds: Any) -> str:
    """Return a duration in seconds as milliseconds ("41", "3.2"), or "-"."""
    x = _num(seconds)
    if x is None:
        return MISSING
    bad = _nonfinite(x)
    if bad:
        return bad
    ms = x * 1000.0
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}"


def fmt_pair(a: Any, b: Any, fa: Callable[[Any], str], fb: Callable[[Any], str]) -> str:
    """Return "mean/max" ("9.4/14"); just the mean when max is missing; "-" when both are."""
    if _num(b) is None:
        return fa(a)
    return f"{fa(a)}/{fb(b)}"


# --------------------------------------------------------------------------- row checks


def _above(v: Any, tol: float) -> bool:
    """Return True when ``v`` exceeds ``tol``; NaN counts as above (it never converged)."""
    x = _num(v)
    return x is not None and (math.isnan(x) or x > tol)


def _fwd_residual(row: Row, stop_mode: str) -> tuple[Any, Any, str]:
    """Return (mean, max, label) of the forward residual that the tolerance applies to."""
    if stop_mode == "abs":
        return row.get("fwd_abs_residual"), row.get("fwd_abs_residual_max"), "abs"
    return row.get("fwd_rel_residual"), row.get("fwd_rel_residual_max"), "rel"


def _fwd_flagged(row: Row, fwd_tol: float, stop_mode: str) -> bool:
    """Return True when the worst forward residual in the batch is above the tolerance."""
    mean, mx, _ = _fwd_residual(row, stop_mode)
    # The max is what the tolerance is about; fall back to the mean when only that was logged.
    return _above(mx if _num(mx) is not None else mean, fwd_tol)


def _is_eval(row: Row) -> bool:
    """Return True for evaluation rows (split "val"/"test")."""
    return row.get("split", "train") not in (None, "train")


def _step_label(row: Row) -> str:
    """Return "120" for training rows and "test@120" for evaluation rows."""
    step = fmt_int(row.get("step"))
    return f"{row['split']}@{step}" if _is_eval(row) else step


def _notes(row: Row, labelled: bool = False) -> str:
    """Return the short solver-health note: stop reason, LS fallbacks, non-finite count.

    ``labelled`` prefixes the stop reason with "stop" so a plain line never reads "... conv".
    """
    parts = []
    if row.get("fwd_stop"):
        parts.append(f"stop {row['fwd_stop']}" if labelled else str(row["fwd_stop"]))
    if (_num(row.get("fallbacks")) or 0) > 0:
        parts.append(f"fallbacks {fmt_int(row['fallbacks'])}" if labelled else f"fb {fmt_int(row['fallbacks'])}")
    if (_num(row.get("nonfinite")) or 0) > 0:
        parts.append(f"nonfinite {fmt_int(row['nonfinite'])}")
    return " ".join(parts) or MISSING


# --------------------------------------------------------------------------- table and line

COLUMNS = ["step", "epoch", "loss", "acc", "lr", "fwd NFE", "fwd res", "conv",
           "bwd NFE", "bwd res", "ms/step", "samp/s", "notes"]


def metric_name(rows: list[Row]) -> str:
    """Return "acc" if any row has accuracy, else "bpc" if any has bpc, else "acc"."""
    if any(_num(r.get("accuracy")) is not None for r in rows):
        return "acc"
    if any(_num(r.get("bpc")) is not None for r in rows):
        return "bpc"
    return "acc"


def row_cells(row: Row, *, fwd_tol: float, bwd_tol: float, stop_mode: str = "rel",
              metric: str = "acc", ppl: bool = False) -> list[Text]:
    """Return the styled table cells of one row, in ``COLUMNS`` order (+ "ppl" when asked)."""
    fwd_mean, fwd_max, _ = _fwd_residual(row, stop_mode)
    conv = _num(row.get("fwd_converged"))
    nonfinite = (_num(row.get("nonfinite")) or 0) > 0
    notes_style = STYLE_BAD if nonfinite or str(row.get("fwd_stop", "")).startswith("nan") else (
        STYLE_WARN if (_num(row.get("fallbacks")) or 0) > 0 else "")
    loss = _num(row.get("loss"))
    cells = [
        Text(_step_label(row)),
        Text(fmt_fixed(row.get("epoch"), 2)),
        Text(fmt_float(row.get("loss")), style=STYLE_BAD if loss is not None and _nonfinite(loss) else ""),
        Text(fmt_pct(row.get("accuracy")) if metric == "acc" else fmt_float(row.get("bpc"))),
        Text(fmt_sci(row.get("lr"))),
        Text(fmt_pair(row.get("fwd_nfe"), row.get("fwd_nfe_max"), fmt_fixed, fmt_int)),
        Text(fmt_pair(fwd_mean, fwd_max, fmt_sci, fmt_sci),
             style=STYLE_BAD if _fwd_flagged(row, fwd_tol, stop_mode) else ""),
        Text(fmt_pct(conv), style=STYLE_WARN if conv is not None and not conv >= 1.0 else ""),
        Text(fmt_fixed(row.get("bwd_nfe"))),
        Text(fmt_sci(row.get("bwd_rel_residual")),
             style=STYLE_BAD if _above(row.get("bwd_rel_residual"), bwd_tol) else ""),
        Text(fmt_ms(row.get("step_time_s"))),
        Text(fmt_int(row.get("samples_per_s"))),
        Text(_notes(row), style=notes_style),
    ]
    if ppl:
        cells.append(Text(fmt_float(row.get("ppl"))))
    return cells


def build_table(rows: list[Row], *, fwd_tol: float, bwd_tol: float, stop_mode: str = "rel",
                title: str = "") -> Table:
    """Return a Rich table of ``rows`` (already bounded by the caller), evaluation rows in bold."""
    metric = metric_name(rows)
    ppl = any(_num(r.get("ppl")) is not None for r in rows)
    res_label = "abs" if stop_mode == "abs" else "rel"
    table = Table(title=title or None,
                  caption=f"fwd tol {fwd_tol:.0e} ({res_label}) · bwd tol {bwd_tol:.0e}",
                  expand=False)
    headers = [metric if c == "acc" else (f"fwd {res_label} res" if c == "fwd res" else c)
               for c in COLUMNS] + (["ppl"] if ppl else [])
    for h in headers:
        table.add_column(h, justify="left" if h in ("step", "notes") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*row_cells(r, fwd_tol=fwd_tol, bwd_tol=bwd_tol, stop_mode=stop_mode,
                                 metric=metric, ppl=ppl),
                      style=STYLE_EVAL if _is_eval(r) else None)
    return table


def plain_line(row: Row, stop_mode: str = "rel") -> str:
    """Return the one-line text form of a row, e.g. "step 120 ep 1 loss 0.3412 acc 91.2% ...".

    A group of fields is left out when every value in it is missing (evaluation rows have no
    lr or backward stats); a single missing value inside a group prints as "-".
    """
    def present(*keys: str) -> bool:
        return any(_num(row.get(k)) is not None for k in keys)

    fwd_mean, fwd_max, label = _fwd_residual(row, stop_mode)
    res_keys = ("fwd_abs_residual", "fwd_abs_residual_max") if label == "abs" else (
        "fwd_rel_residual", "fwd_rel_residual_max")
    parts = [f"{row['split']} " if _is_eval(row) else ""]
    parts[0] += f"step {fmt_int(row.get('step'))} ep {fmt_fixed(row.get('epoch'), 2)}"
    if present("loss"):
        parts.append(f"loss {fmt_float(row.get('loss'))}")
    if present("accuracy"):
        parts.append(f"acc {fmt_pct(row.get('accuracy'))}")
    if present("bpc"):
        parts.append(f"bpc {fmt_float(row.get('bpc'))}")
    if present("ppl"):
        parts.append(f"ppl {fmt_float(row.get('ppl'))}")
    if present("lr"):
        parts.append(f"lr {fmt_sci(row.get('lr'))}")
    if present("fwd_nfe", "fwd_nfe_max", "fwd_converged", *res_keys):
        parts.append(
            f"fwd nfe {fmt_pair(row.get('fwd_nfe'), row.get('fwd_nfe_max'), fmt_fixed, fmt_int)}"
            f" {label} {fmt_pair(fwd_mean, fwd_max, fmt_sci, fmt_sci)}"
            f" conv {fmt_pct(row.get('fwd_converged'))}")
    if present("bwd_nfe", "bwd_rel_residual"):
        parts.append(f"bwd nfe {fmt_fixed(row.get('bwd_nfe'))} rel {fmt_sci(row.get('bwd_rel_residual'))}")
    if present("step_time_s"):
        parts.append(f"{fmt_ms(row.get('step_time_s'))} ms/step")
    if present("samples_per_s"):
        parts.append(f"{fmt_int(row.get('samples_per_s'))} samp/s")
    notes = _notes(row, labelled=True)
    if notes != MISSING:
        parts.append(notes)
    return " ".join(parts)


# --------------------------------------------------------------------------- the view


class _Display:
    """Renderable that the Live refreshes: the current table above the progress bar."""

    def __init__(self, view: "TrainView") -> None:
        self.view = view

    def __rich__(self) -> RenderableType:
        # Only the reference is read here: the table is rebuilt in log(), never per refresh.
        return Group(self.view._table, self.view._progress)


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
        self.rows: deque[Row] = deque(maxlen=max_rows)
        self._live: Live | None = None
        self._table = self.table()
        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=self.console)
        self._task: TaskID = self._progress.add_task("train", total=total_steps, start=False)

    def __enter__(self) -> "TrainView":
        if not self.plain:
            # start_task resets the clock so "elapsed" counts from here, not from __init__.
            self._progress.start_task(self._task)
            self._live = Live(_Display(self), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.refresh()  # final state (last rows, last step) stays on screen
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def table(self) -> Table:
        """Return a freshly built table of the last ``max_rows`` logged rows."""
        return build_table(list(self.rows), fwd_tol=self.fwd_tol, bwd_tol=self.bwd_tol,
                           stop_mode=self.stop_mode, title=self.title)

    def log(self, row: Row) -> None:
        """Show one logged training step or evaluation result; returns nothing."""
        if self.plain:
            self._out(plain_line(row, self.stop_mode))
            return
        self.rows.append(dict(row))
        self._table = self.table()  # the Live picks it up on its next auto-refresh

    def event(self, text: str) -> None:
        """Print a message above the live table (or as a plain line); returns nothing."""
        if self.plain:
            self._out(text)
        elif self._live is not None:
            self._live.console.print(text, markup=False)  # paths may contain "[...]"
        else:
            self.console.print(text, markup=False)

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
