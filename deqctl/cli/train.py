"""`deqctl train RECIPE [key.sub=value ...]`"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .. import progress
from .. import recipe as recipes
from ..engine import checkpoint
from ..engine.checkpoint import CheckpointWriteError
from ..engine.distributed import Group, broadcast, join, leave
from ..engine.metrics import MetricsWriteError
from ..engine.resume import check_changes, run_of
from ..engine.rundir import RunDirError, RunLock, claim_new, lock_existing
from ..engine.trackers import TrackerError
from ..engine.train import Interrupted, TrainingDiverged, train as run_training
from ..ui import TrainView
from .common import FAILED, TRUST_CODE, USAGE, fail, say_user_code, split_args, user_errors


@dataclass
class Resume:
    """What `--resume` continues: read from the checkpoint, nothing written."""

    folder: Path                   # the checkpoint
    recipe: recipes.Recipe         # its recipe with the overrides applied
    warnings: list[str]
    run_dir: Path | None           # where it writes (None: a loose checkpoint, no --out)
    new_dir: bool                  # --out elsewhere: a new run directory to claim


@user_errors
def train(
    args: Optional[List[str]] = typer.Argument(
        None, help="RECIPE.yaml followed by overrides key.sub=value (with --resume: overrides only)"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/NAME-TIME)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue a run or checkpoint"),
    plain: Optional[bool] = typer.Option(None, "--plain/--live",
                                         help="plain lines or live table (default: live on a terminal)"),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Train a DEQ from a YAML recipe, showing fixed-point residuals and solver NFE live."""
    path, overrides = split_args(args)
    if resume is not None:
        if path is not None:
            fail("with --resume, give only overrides (the recipe comes from the checkpoint)", USAGE)
        plan = _plan_resume(resume, overrides, out, trust_code)
        recipe, run_dir, new_dir = plan.recipe, plan.run_dir, plan.new_dir
    else:
        if path is None:
            fail("missing RECIPE.yaml (e.g. deqctl train configs/mnist-deq.yaml)", USAGE)
        recipe = recipes.load(path, overrides)
        plan, run_dir, new_dir = None, out, True
    say_user_code(recipe)                          # importing it is the first thing said
    group = join(recipe.runtime.device)            # torchrun: its process group, else none
    try:
        lock, run_dir = _claim(group, run_dir, new_dir, recipe.name)
        try:
            if plan is not None:   # read again under the lock: the run may have moved on
                plan = _plan_resume(resume, overrides, out, trust_code)
            _run(plan.recipe if plan else recipe, run_dir, plan, plain, group)
        finally:
            if lock is not None:
                lock.release()
    finally:
        leave(group)


def _plan_resume(resume: Path, overrides: list[str], out: Path | None, trust_code: bool
                 ) -> Resume:
    folder = checkpoint.resolve(resume)
    base, _ = checkpoint.read_meta(folder, trust_code)
    recipe, _ = checkpoint.read_meta(folder, trust_code, overrides) if overrides else (base, None)
    warnings = check_changes(base, recipe)
    own = run_of(folder)
    if out is None and own is None:
        fail(f"{folder} is not inside a run's checkpoints folder; give --out DIR for the "
             f"resumed run", USAGE)
    run_dir = out or own
    new_dir = own is None or run_dir.resolve() != own.resolve()
    return Resume(folder, recipe, warnings, run_dir, new_dir)


def _claim(group: Group, run_dir: Path | None, new_dir: bool, name: str
           ) -> tuple[RunLock | None, Path]:
    """Rank 0 claims (a new run) or locks (a resumed one) the run directory; every rank
    learns which folder it is, or the one-line reason it cannot be had (exit 2)."""
    lock, error = None, None
    if group.writer:
        try:
            lock = claim_new(run_dir, name) if new_dir else lock_existing(run_dir)
        except (RunDirError, OSError) as exc:
            error = str(exc)
    where, error = broadcast(group, (str(lock.run_dir) if lock else None, error))
    if error is not None:
        if not group.writer:           # rank 0 says it for all
            raise typer.Exit(USAGE)
        fail(error, USAGE)
    if lock is not None and lock.stale is not None:
        typer.echo(f"note: {lock.run_dir} was locked by {lock.stale.describe()}, which is no "
                   f"longer running; taking it over")
    return lock, Path(where)


def _run(recipe, run_dir: Path, plan: Resume | None, plain: bool | None, group: Group) -> None:
    console = Console(quiet=not group.writer)      # one process speaks for all
    view = TrainView(None, fwd_tol=recipe.deq.forward.tol,
                     bwd_tol=recipe.deq.backward.tol, stop_mode=recipe.deq.forward.stop_mode,
                     title=f"deqctl train: {recipe.name} -> {run_dir}", console=console,
                     plain=plain)
    for warning in plan.warnings if plan else []:
        console.print(f"warning: {warning}", markup=False, soft_wrap=True)
    try:
        with view, progress.shown_by(view.work):
            result = run_training(recipe, run_dir, view, resume=plan.folder if plan else None,
                                  group=group)
    except (TrainingDiverged, CheckpointWriteError, MetricsWriteError, TrackerError,
            Interrupted) as exc:
        code = exc.code if isinstance(exc, Interrupted) else FAILED
        if not group.writer:        # rank 0 says it for all
            raise typer.Exit(code) from None
        fail(str(exc), code)
    if result.already_finished:
        console.print(f"{run_dir} already finished at step {result.steps} "
                      f"({view.task.summary(result.final)}); nothing to do (raise "
                      f"train.max_steps or train.epochs to train on)", markup=False,
                      soft_wrap=True)
        return
    console.print(f"done: {result.steps} steps, test loss {result.final['loss']:.4f}, "
                  f"{view.task.summary(result.final)}; run saved in {run_dir}", markup=False,
                  soft_wrap=True)
