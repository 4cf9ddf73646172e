"""The rules for continuing a run: where it may write, which settings may change, and how
its metrics stay one row per (split, step) after any number of crashes and resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from .. import recipe as recipes
from ..files import free_name, read_text, write_atomic
from ..yamlio import MAX_BYTES
from . import checkpoint
from .metrics import read_rows
from .rundir import CHECKPOINTS, METRICS, RECIPE

# Settings a resumed run may change. Everything else changes shapes, the data order, the
# optimizer or what the saved state means, and would silently break the run.
MAY_CHANGE = ("train.", "log.", "runtime.device", "runtime.threads", "runtime.deterministic",
              "runtime.compile", "data.root", "data.download",
              "deq.eval.", "data.eval_batch_size", "data.limit_eval", "data.workers")
# ... and these change the schedule (the learning rate follows the new total).
SCHEDULE = ("train.epochs", "train.max_steps")


def check_changes(saved: recipes.Recipe, wanted: recipes.Recipe) -> list[str]:
    """Return warnings for allowed changes; RecipeError (one line) for any other."""
    a, b = recipes.flat(saved.model_dump(mode="json")), recipes.flat(wanted.model_dump(mode="json"))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    refused = [k for k in changed if not k.startswith(MAY_CHANGE)]
    if refused:
        raise recipes.RecipeError(
            f"cannot change {', '.join(refused)} when resuming (it changes shapes, the data "
            f"order or the optimizer); start a new run from the recipe instead")
    return [f"{k} changed from {a.get(k)} to {b.get(k)}: the learning-rate schedule follows "
            f"the new length" for k in changed if k in SCHEDULE]


def continue_run(run_dir: Path, folder: Path, recipe: recipes.Recipe, state: Any, view: Any
                 ) -> None:
    """Make a run's files what the checkpoint resumed from knows, in an order a crash at
    any point leaves resumable: later checkpoints are set aside before the rows they
    account for are dropped (so the next `--resume RUN` finds this checkpoint), and a
    hand-edited recipe is kept under a new name before recipe.yaml is rewritten."""
    later = set_aside_later(run_dir, state.step)
    if later:
        view.event(f"checkpoints of later steps set aside: {', '.join(later)}")
    dropped = trim_metrics(run_dir / METRICS, state.step, state.logged, warn=view.event)
    if dropped:
        view.event(f"dropped {dropped} metrics rows logged after the checkpoint resumed "
                   f"from (step {state.step})")
    edited = keep_edited_recipe(run_dir, folder, recipe)
    if edited:
        view.event(f"warning: {edited}")


def run_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint folder belongs to (RUN/checkpoints/NAME), or None."""
    parent = checkpoint.parent
    if parent.name == CHECKPOINTS and (parent.parent / RECIPE).is_file():
        return parent.parent
    return None


def trim_metrics(path: Path, step: int, logged: list[str] | None,
                 warn: Callable[[str], None] | None = None) -> int:
    """Keep the rows the checkpoint of `step` accounts for: those of earlier steps, and of
    its own step those of the splits in `logged` (all, when None); rewrite the file
    atomically; returns how many rows were dropped. A row cut off by a crash is dropped
    too; any other broken line is a CheckpointError naming it."""
    if not path.is_file():
        return 0
    try:
        rows = read_rows(path, warn)
    except (OSError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"{exc}; fix or remove that line to resume") from None
    keep = [r for r in rows if r["step"] < step
            or (r["step"] == step and (logged is None or r["split"] in logged))]
    lines = len([line for line in path.read_bytes().splitlines() if line.strip()])
    if len(keep) == lines:
        return 0
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
    return lines - len(keep)


def set_aside_later(run_dir: Path, step: int) -> list[str]:
    """Rename the run's checkpoints of steps after `step` to NAME.superseded (or
    NAME.superseded-2, ... when an earlier set-aside has that name: none is ever
    deleted): resuming from an earlier checkpoint abandons them, and a later
    `--resume RUN` must not pick them. Returns their new names."""
    moved = []
    for folder in checkpoint.checkpoints(run_dir):
        if (checkpoint.step_of(folder) or 0) > step:
            target = free_name(folder.parent, folder.name.removesuffix(".old") + ".superseded")
            os.replace(folder, target)
            moved.append(target.name)
    return moved


def keep_edited_recipe(run_dir: Path, folder: Path, recipe: recipes.Recipe) -> str | None:
    """Before a resume rewrites RUN/recipe.yaml: if it says something other than the
    checkpoint resumed from (edited by hand, or written by a resume whose checkpoints
    were given up), move it aside as recipe.edited.yaml and return a warning naming the
    settings this resume ignores; None when there is nothing to say. Both files are only
    parsed, never validated: nothing they name is imported."""
    path = run_dir / RECIPE
    try:
        text = read_text(path, MAX_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        text = None               # unreadable: still the user's, kept below
    if text == recipes.dump(recipe):
        return None
    stored = recipes.load_raw(folder / RECIPE)
    base, given = recipes.flat(stored), recipes.flat(recipe.model_dump(mode="json"))
    try:
        edited = recipes.flat(recipes.parse(text, str(path))) if text is not None else None
    except recipes.RecipeError:
        edited = None
    if edited is None:
        what = "is not a valid recipe"
    else:
        ignored = sorted(k for k in edited.keys() | base.keys()
                         if edited.get(k) != base.get(k) and edited.get(k) != given.get(k))
        if not ignored:
            return None
        what = f"sets {', '.join(ignored[:8])}{' ...' if len(ignored) > 8 else ''}"
    copy = free_name(run_dir, "recipe.edited", ".yaml")
    os.replace(path, copy)
    return (f"{path} {what}, unlike checkpoint {folder.name}: ignored (a resume continues "
            f"from its checkpoint's recipe; change settings with overrides, e.g. deqctl "
            f"train --resume {run_dir} train.max_steps=N); that file is kept as {copy}")
