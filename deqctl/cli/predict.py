"""`deqctl predict RUN INPUT... [deq.eval.*=...] [--out FILE.csv|FILE.jsonl] [--top-k K]`"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, List, Optional, TextIO

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from ..files import Output
from ..inspect import open_source
from ..predict import Failed, Predictor, Reader
from ..ui.fmt import fmt_float, fmt_pct, fmt_sci
from ..numbers import strict_json
from .common import (FAILED, INTERRUPTED, TRUST_CODE, USAGE, fail, one_line, progress_bar,
                     user_errors)

# test-time settings only: the weights fix the model, the inputs replace the data
PREDICT_OVERRIDES = ("deq.eval", "runtime", "data.eval_batch_size", "data.layout")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)*=")
FORMATS = {".csv": "csv", ".jsonl": "jsonl"}


@user_errors
def predict(
    args: Optional[List[str]] = typer.Argument(
        None, help="RUN_OR_CHECKPOINT, then INPUT... (image files, folders, globs, .npz "
                   "with x, .csv series) and overrides deq.eval.*, runtime.*, "
                   "data.eval_batch_size"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the rows to FILE.csv or "
                                       "FILE.jsonl (default: a table on a terminal, CSV "
                                       "when stdout is a pipe)"),
    top_k: int = typer.Option(1, "--top-k", min=1, max=1000,
                              help="classifiers: also the next K-1 classes"),
    every: bool = typer.Option(False, "--every", help="forecasters: a forecast at every "
                               "window of a CSV, not only after its last"),
    time_column: Optional[str] = typer.Option(None, "--time-column", help="forecasters: "
                                              "the CSV's time column (default: the recipe's, "
                                              "else the first column the model does not read)"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines on stdout"),
    force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Apply a trained model to new inputs: a class or a forecast per input, with that
    input's solve (NFE, relative residual, converged). Exit 1 when any input failed."""
    path, inputs, overrides = _split(args or [])
    if path is None:
        fail("missing RUN_OR_CHECKPOINT (e.g. deqctl predict runs/mnist-deq digits/)", USAGE)
    if not inputs:
        fail(f"no INPUT after {path}: give image files, folders, globs, .npz or .csv files",
             USAGE)
    # what is named is never an output; what a folder or glob finds is checked once found
    target = _target(out, as_json, force, (Path(path), *(Path(i).expanduser() for i in inputs)))
    src = open_source(path, overrides, trust_code=trust_code, allowed=PREDICT_OVERRIDES)
    info = src.info
    if info.task == "lm":
        fail(f"{path} is a language model; continue a text with "
             f"deqctl generate {path} --prompt TEXT", USAGE)
    if info.task == "tag":       # an answer per position: eval scores it, rows cannot
        fail(f"{path} tags every position (task tag); predict answers one class or one "
             f"forecast per input: score it with deqctl eval {path}", USAGE)
    if info.inputs == "tokens":
        fail(f"{path} reads token ids; predict reads images, .npz and CSV files", USAGE)
    data = src.recipe.data
    reader = Reader(info, layout=getattr(data, "layout", "auto"), every=every,
                    time_column=time_column or getattr(data, "time_column", None),
                    any_length=src.model.dynamic_length)
    found = reader.read(inputs)
    if target["output"] is not None:
        target["output"].reading += tuple(found.files)
        target["output"].check()
    solver = src.recipe.deq.eval_settings().spec()
    predictor = Predictor(src.model, device=src.device, solver=solver,
                          precision=src.recipe.runtime.precision,
                          batch_size=data.eval_batch_size, top_k=top_k)
    err = Console(stderr=True)
    say = (lambda text: err.print(text, markup=False, highlight=False, soft_wrap=True))
    say(f"{src.label}: {len(found)} input(s); {src.recipe.deq.describe_eval()}; "
        f"device {src.device} ({src.device_reason})")
    done = _Tally()
    with ExitStack() as stack:
        write = _open_sink(target, predictor.columns, stack)
        progress = stack.enter_context(progress_bar(err))
        try:
            _predict_all(found, predictor, write, progress, done)
        except KeyboardInterrupt:
            done.interrupted = True
    say(done.summary(target))
    if done.interrupted:
        raise typer.Exit(INTERRUPTED)
    if done.failed:
        raise typer.Exit(FAILED)


def _predict_all(found, predictor: Predictor, write: Callable[[list[dict]], None],
                 progress: Progress, done: "_Tally") -> None:
    """Predict every readable input, writing rows batch by batch; each input that failed
    is named as it comes (above the bar), and counted."""
    bar = progress.add_task("predict", total=len(found))

    def readable():
        for entry in found:
            if isinstance(entry, Failed):
                done.failed += 1
                progress.console.print(f"skipped {one_line(entry.name)}: "
                                       f"{one_line(entry.reason)}", markup=False,
                                       highlight=False, soft_wrap=True)
                progress.advance(bar)
            else:
                yield entry

    for items, rows in predictor.rows(readable()):
        write(rows)
        done.add(rows, len(items))
        progress.advance(bar, len(items))


def _split(args: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(the run, the inputs, the overrides): after the run, an argument is an override
    when it reads key.sub=value and names no existing file."""
    if not args:
        return None, [], []
    inputs, overrides = [], []
    for a in args[1:]:
        (overrides if _OVERRIDE.match(a) and not Path(a).exists() else inputs).append(a)
    return args[0], inputs, overrides


def _target(out: Path | None, as_json: bool, force: bool, reading: tuple[Path, ...]
            ) -> dict[str, Any]:
    """Where rows go: {"kind": csv | jsonl | table, "output": Output | None}; --out
    checked before any work, so a refusal costs nothing."""
    if out is None:
        kind = "jsonl" if as_json else ("table" if sys.stdout.isatty() else "csv")
        return {"kind": kind, "output": None}
    if as_json:
        fail("--json prints rows on stdout; with --out name a .jsonl file instead", USAGE)
    kind = FORMATS.get(out.suffix.lower())
    if kind is None:
        fail(f"--out {out}: name a .csv or .jsonl file", USAGE)
    return {"kind": kind, "output": Output(out, force, "--out", reading).check()}


def _open_sink(target: dict[str, Any], columns: list[str], stack: ExitStack
               ) -> Callable[[list[dict]], None]:
    """A function writing rows as they come: into --out's temporary file (moved into
    place when the command ends, interrupted or not), or to stdout."""
    kind, output = target["kind"], target["output"]
    if output is not None:
        tmp = stack.enter_context(output.writing())
        fh = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
    else:
        fh = sys.stdout
    if kind == "table":
        table = _Table(columns)
        stack.callback(lambda: Console().print(table.table))
        return table.add
    return _csv_writer(fh, columns) if kind == "csv" else _jsonl_writer(fh)


def _csv_writer(fh: TextIO, columns: list[str]) -> Callable[[list[dict]], None]:
    writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
    writer.writeheader()

    def write(rows: list[dict]) -> None:
        writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
        fh.flush()
    return write


def _jsonl_writer(fh: TextIO) -> Callable[[list[dict]], None]:
    def write(rows: list[dict]) -> None:
        for r in rows:
            fh.write(json.dumps(strict_json(r), allow_nan=False) + "\n")
        fh.flush()
    return write


def _cell(v: Any) -> Any:
    return str(v).lower() if isinstance(v, bool) else v


class _Table:
    """The rows as a Rich table, printed once all are in (a terminal, no --out)."""

    def __init__(self, columns: list[str]):
        self.table = Table(show_header=True)
        for c in columns:
            self.table.add_column(c, justify="left" if c in ("input", "prediction", "time")
                                  or c.startswith("prediction_") else "right")
        self.columns = columns

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            self.table.add_row(*(Text(_show(c, r[c])) for c in self.columns))   # no markup


def _show(column: str, v: Any) -> str:
    if column.startswith("probability"):
        return fmt_pct(v)
    if column == "rel_residual":
        return fmt_sci(v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    return fmt_float(v, 6) if isinstance(v, float) else str(v)


class _Tally:
    """What was predicted, for the closing line."""

    def __init__(self):
        self.inputs = self.failed = self.rows = self.converged = 0
        self.nfe = 0.0
        self.interrupted = False
        self.start = time.perf_counter()

    def add(self, rows: list[dict], inputs: int) -> None:
        # a forecast's rows repeat its input's solve once per step ahead: count inputs
        solves = {r["input"]: r for r in rows}.values()
        self.inputs += inputs
        self.rows += len(rows)
        self.nfe += sum(r["nfe"] for r in solves)
        self.converged += sum(bool(r["converged"]) for r in solves)

    def summary(self, target: dict[str, Any]) -> str:
        elapsed = time.perf_counter() - self.start
        text = (f"predicted {self.inputs} input(s)"
                f"{f', {self.failed} failed' if self.failed else ''} in {elapsed:.1f} s "
                f"({self.inputs / elapsed:.0f}/s)")
        if self.inputs:
            text += (f"; NFE mean {self.nfe / self.inputs:.1f}, converged "
                     f"{fmt_pct(self.converged / self.inputs)}")
        if target["output"] is not None:
            text += f"; {self.rows} row(s) in {target['output'].path}"
        if self.interrupted:
            text = "interrupted: " + text
        return text
