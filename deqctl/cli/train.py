"""`deqctl train RECIPE [key.sub=value ...]`"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .. import recipe as recipes
from ..engine import checkpoint
from ..engine.checkpoint import CheckpointWriteError
from ..engine.distributed import Group, broadcast, join, leave
from ..engine.resume import check_changes, run_of
from ..engine.train import Interrupted, TrainingDiverged, train as run_training
from ..ui import TrainView
from .common import FAILED, USAGE, fail, split_args, user_errors


@user_errors
def train(
    args: Optional[List[str]] = typer.Argument(
        None, help="RECIPE.yaml followed by overrides key.sub=value (with --resume: overrides only)"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/NAME-TIME)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue a run or checkpoint"),
    plain: Optional[bool] = typer.Option(None, "--plain/--live",
                                         help="plain lines or live table (default: live on a terminal)"),
) -> None:
    """Train a DEQ from a YAML recipe, showing fixed-point residuals and solver NFE live."""
    path, overrides = split_args(args)
    warnings: list[str] = []
    if resume is not None:
        if path is not None:
            fail("with --resume, give only overrides (the recipe comes from the checkpoint)", USAGE)
        folder = checkpoint.resolve(resume)
        base, _ = checkpoint.read_meta(folder)
        raw = recipes.apply_overrides(base.model_dump(mode="json"), overrides)
        recipe = recipes.validate(raw, source="overrides")
        warnings = check_changes(base, recipe)
        own = run_of(folder)
        if out is None and own is None:
            fail(f"{folder} is not inside a run's checkpoints folder; give --out DIR for the "
                 f"resumed run", USAGE)
        run_dir = out or own
        if own is None or run_dir.resolve() != own.resolve():
            _refuse_nonempty(run_dir)
    else:
        if path is None:
            fail("missing RECIPE.yaml (e.g. deqctl train configs/mnist-deq.yaml)", USAGE)
        recipe = recipes.load(path, overrides)
        run_dir, folder = out, None
    group = join(recipe.runtime.device)            # torchrun: its process group, else none
    if folder is None:
        # the default name holds the start time: rank 0's, on every rank
        run_dir = run_dir or broadcast(group, Path("runs") /
                                       f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (run_dir / "metrics.jsonl").exists():
            fail(f"{run_dir} already holds a run; choose another --out or use --resume {run_dir}",
                 USAGE)
        _refuse_nonempty(run_dir)
    try:
        _run(recipe, run_dir, folder, warnings, plain, group)
    finally:
        leave(group)


def _run(recipe, run_dir: Path, folder: Path | None, warnings: list[str], plain: bool | None,
         group: Group) -> None:
    console = Console(quiet=not group.writer)      # one process speaks for all
    view = TrainView(None, fwd_tol=recipe.deq.forward.tol,
                     bwd_tol=recipe.deq.backward.tol, stop_mode=recipe.deq.forward.stop_mode,
                     title=f"deqctl train: {recipe.name} -> {run_dir}", console=console,
                     plain=plain)
    for warning in warnings:
        console.print(f"warning: {warning}", markup=False)
    try:
        with view:
            result = run_training(recipe, run_dir, view, resume=folder, group=group)
    except (TrainingDiverged, CheckpointWriteError, Interrupted) as exc:
        code = exc.code if isinstance(exc, Interrupted) else FAILED
        if not group.writer:        # rank 0 says it for all
            raise typer.Exit(code) from None
        fail(str(exc), code)
    if result.already_finished:
        console.print(f"{run_dir} already finished at step {result.steps} "
                      f"({view.task.summary(result.final)}); nothing to do (raise "
                      f"train.max_steps or train.epochs to train on)", markup=False)
        return
    console.print(f"done: {result.steps} steps, test loss {result.final['loss']:.4f}, "
                  f"{view.task.summary(result.final)}; run saved in {run_dir}", markup=False)


def _refuse_nonempty(run_dir: Path) -> None:
    """A new run never writes into a folder that holds anything: its files are the user's."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        fail(f"{run_dir} exists and is not empty; choose another --out", USAGE)
