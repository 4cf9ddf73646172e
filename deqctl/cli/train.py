"""`deqctl train RECIPE [key.sub=value ...]`"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .. import recipe as recipes
from ..engine import checkpoint
from ..engine.train import Interrupted, TrainingDiverged, train as run_training
from ..ui import TrainView
from .common import FAILED, INTERRUPTED, USAGE, fail, split_args, user_errors


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
    if resume is not None:
        if path is not None:
            fail("with --resume, give only overrides (the recipe comes from the checkpoint)", USAGE)
        folder = checkpoint.resolve(resume)
        base, _ = checkpoint.read_meta(folder)
        raw = recipes.apply_overrides(base.model_dump(mode="json"), overrides)
        recipe = recipes.validate(raw, source="overrides")
        run_dir = out or folder.parent.parent
    else:
        if path is None:
            fail("missing RECIPE.yaml (e.g. deqctl train configs/mnist-deq.yaml)", USAGE)
        recipe = recipes.load(path, overrides)
        run_dir = out or Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (run_dir / "metrics.jsonl").exists():
            fail(f"{run_dir} already holds a run; choose another --out or use --resume {run_dir}",
                 USAGE)
        folder = None

    console = Console()
    view = TrainView(None, fwd_tol=recipe.deq.forward.tol,
                     bwd_tol=recipe.deq.backward.tol, stop_mode=recipe.deq.forward.stop_mode,
                     title=f"deqctl train: {recipe.name} -> {run_dir}", console=console,
                     plain=plain)
    try:
        with view:
            result = run_training(recipe, run_dir, view, resume=folder)
    except TrainingDiverged as exc:
        fail(str(exc), FAILED)
    except Interrupted as exc:
        fail(str(exc), INTERRUPTED)
    console.print(f"done: {result.steps} steps, test loss {result.final['loss']:.4f}, "
                  f"{view.task.summary(result.final)}; run saved in {run_dir}", markup=False)

