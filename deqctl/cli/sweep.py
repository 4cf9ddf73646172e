"""`deqctl sweep RECIPE [key=v1,v2 ...] [--seeds 0,1,2] --out DIR [--jobs N] [--print-commands]`"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .. import recipe as recipes
from ..engine.rundir import is_run
from ..errors import quote
from ..sweep import (Point, SweepError, SweepLock, SweepRunner, continue_plan, last_rows,
                     make_plan, shell_command, validate_points)
from ..ui.fmt import fmt_float
from .common import FAILED, INTERRUPTED, USAGE, fail, say_user_code, user_errors

SEED_LIMIT = 1000


@user_errors
def sweep(
    args: Optional[List[str]] = typer.Argument(
        None, help="RECIPE.yaml, then key=a,b,c (an axis) or key=value (every point) "
                   "overrides; [a,b] or quotes keep a value holding a comma whole"),
    out: Path = typer.Option(..., "--out", help="the sweep's folder: a run directory per "
                             "point, and sweep.json"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated seeds, an "
                                        "axis of their own, e.g. 0,1,2"),
    jobs: int = typer.Option(1, "--jobs", min=1, max=256,
                             help="points run at once (the CPU threads shared out)"),
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="run failed points again (resuming their runs)"),
    print_commands: bool = typer.Option(False, "--print-commands", help="print one deqctl "
                                        "train command per point (a scheduler's job array) "
                                        "and run nothing"),
    plain: Optional[bool] = typer.Option(None, "--plain/--live",
                                         help="plain lines or live table (default: live on a terminal)"),
    trust_code: bool = typer.Option(False, "--trust-code", help="also resume point runs "
                                    "that recorded their user code at other paths than the "
                                    "recipe names (a sweep folder from another machine): "
                                    "that imports it, so only for folders you trust"),
) -> None:
    """Run a grid of ordinary training runs, resumably: the same command again skips the
    finished points and resumes the interrupted ones. Exit 1 when any point failed."""
    args = list(args or [])
    if not args or "=" in args[0] and not Path(args[0]).exists():
        fail("missing RECIPE.yaml (e.g. deqctl sweep configs/co2-forecast-deq.yaml "
             "optim.lr=1e-3,3e-3 --seeds 0,1 --out sweeps/lr)", USAGE)
    try:
        # stdout is the commands alone: what planning says (and what user code it imports
        # prints) goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            plan = make_plan(args[0], args[1:], _seeds(seeds) if seeds is not None else None)
            _say_user_code(validate_points(plan))
        _check_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        lock = SweepLock(out)
    except SweepError as exc:
        fail(str(exc), USAGE)
    try:
        plan = continue_plan(out, plan)
        if print_commands:
            plan.save(out)
            for p in plan.points:
                typer.echo(shell_command(plan, p, out))
            return
        _run(plan, out, jobs, retry_failed, trust_code, plain)
    except SweepError as exc:
        fail(str(exc), USAGE)
    finally:
        lock.release()


def _seeds(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.lstrip("-").isascii() and p.lstrip("-").isdigit() and len(p) <= 12
               for p in parts) or len(parts) > SEED_LIMIT:
        fail(f"--seeds: expected comma-separated integers like 0,1,2 (got {quote(text)})", USAGE)
    seeds = [int(p) for p in parts]
    if len(set(seeds)) < len(seeds):
        fail(f"--seeds: a seed given twice ({quote(text)})", USAGE)
    return seeds


def _say_user_code(planned: list[recipes.Recipe]) -> None:
    """train's `user code: ...` line, once for each part the points import."""
    said = set()
    for recipe in planned:
        fresh = {key: part for key, part in recipe.user_code().items()
                 if (key, part.ref, part.path) not in said}
        said.update((key, part.ref, part.path) for key, part in fresh.items())
        if fresh:
            say_user_code(SimpleNamespace(user_code=lambda parts=fresh: parts))


def _check_folder(out: Path) -> None:
    """--out is new, empty, or a sweep's folder: a sweep never mixes its runs with others,
    nor puts them inside another run."""
    run = _run_around(out)
    if run is not None:
        raise SweepError(f"--out {out}: inside the run {run}; a sweep's folder holds its own "
                         f"runs: give one outside any run")
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out}: a file, not a folder")
    if out.is_dir() and not (out / "sweep.json").exists() and any(
            p.name != ".sweep.lock" for p in out.iterdir()):
        raise SweepError(f"--out {out}: holds files but no sweep.json; give a new or empty "
                         f"folder")


def _run_around(out: Path) -> Path | None:
    """The run directory `out` is, or lies inside (as spelled, or with links resolved)."""
    spelled = Path(os.path.abspath(out))
    for where in (spelled, spelled.resolve()):
        for folder in (where, *where.parents):
            try:
                if is_run(folder):
                    return folder
            except OSError:            # a parent this user may not look into
                continue
    return None


def _run(plan, out: Path, jobs: int, retry_failed: bool, trust_code: bool,
         plain: bool | None) -> None:
    console = Console()
    live_view = console.is_terminal if plain is None else not plain
    start = time.time()

    def event(kind: str, p: Point, text: str) -> None:
        if kind == "note" or not live_view:
            console.print(f"{kind} {p.name}: {text}" if kind != "note" else f"note: {text}",
                          markup=False, highlight=False, soft_wrap=True)

    runner = SweepRunner(plan, out, jobs=jobs, retry_failed=retry_failed,
                         trust_code=trust_code, on_event=event)
    queue = runner.todo()
    done = sum(p.status == "finished" for p in plan.points)
    console.print(f"sweep {out}: {len(plan.points)} point(s) of {plan.recipe}, {done} "
                  f"finished before; {jobs} at a time, {runner.threads} thread(s) each",
                  markup=False, highlight=False, soft_wrap=True)
    if live_view:
        progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console)
        bar = progress.add_task("sweep", total=len(plan.points))
        with Live(console=console, auto_refresh=False, transient=False) as live:
            def view(r: SweepRunner) -> None:
                progress.update(bar, completed=sum(p.status == "finished" for p in plan.points))
                live.update(Group(_table(r, out), progress), refresh=True)
            runner.view = view
            runner.run(queue)
            view(runner)
    else:
        runner.run(queue)
    counts = {s: sum(p.status == s for p in plan.points)
              for s in ("finished", "failed", "interrupted", "pending")}
    console.print(f"sweep {out}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) +
                  f" ({time.time() - start:.0f} s); compare them: deqctl compare {out}",
                  markup=False, highlight=False, soft_wrap=True)
    for p in plan.points:
        if p.status == "failed":
            console.print(f"failed {p.name}: {p.message} (log: {out / 'logs' / (p.name + '.log')})",
                          markup=False, highlight=False, soft_wrap=True)
    if runner.interrupted:
        typer.echo("interrupted: the same command resumes the sweep", err=True)
        raise typer.Exit(INTERRUPTED)
    if counts["failed"]:
        raise typer.Exit(FAILED)


def _table(runner: SweepRunner, out: Path) -> Table:
    """The points: status, step, loss and the latest test metric, time (bounded: the
    running ones first, then the last that ended)."""
    table = Table(show_header=True)
    for col in ("point", "status", "step", "loss", "test", "time"):
        table.add_column(col, justify="left" if col in ("point", "status") else "right")
    order = {"running": 0, "failed": 1, "interrupted": 2, "finished": 3, "pending": 4}
    shown = sorted(runner.plan.points, key=lambda p: order.get(p.status, 5))[:20]
    for p in shown:
        rows = last_rows(out / p.name) if p.status != "pending" else {}
        train, test = rows.get("train", {}), rows.get("test", {})
        metric = next((f"{k} {fmt_float(test[k])}" for k in ("accuracy", "mase", "bpc", "mae")
                       if k in test), "-")
        job = runner.running.get(p.name)
        took = f"{time.time() - job.started:.0f} s" if job else (
            f"{train.get('wall_s', 0):.0f} s" if train else "-")
        table.add_row(Text(p.name), p.status, str(train.get("step", "-")),
                      fmt_float(train.get("loss")), metric, took)
    hidden = len(runner.plan.points) - len(shown)
    if hidden:
        table.caption = f"... and {hidden} more"
    return table

