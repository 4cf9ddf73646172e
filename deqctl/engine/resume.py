"""The rules for continuing a run: where it may write, which settings may change, and how
its metrics stay one row per (split, step) after any number of crashes and resumes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import recipe as recipes
from . import checkpoint

# Settings a resumed run may change. Everything else changes shapes, the data order, the
# optimizer or what the saved state means, and would silently break the run.
MAY_CHANGE = ("train.", "log.", "runtime.device", "runtime.threads", "runtime.deterministic",
              "runtime.compile", "data.root", "data.download",
              "deq.eval.", "data.eval_batch_size", "data.limit_eval")
# ... and these change the schedule (the learning rate follows the new total).
SCHEDULE = ("train.epochs", "train.max_steps")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_changes(saved: recipes.Recipe, wanted: recipes.Recipe) -> list[str]:
    """Return warnings for allowed changes; RecipeError (one line) for any other."""
    a, b = _flat(saved.model_dump(mode="json")), _flat(wanted.model_dump(mode="json"))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    refused = [k for k in changed if not k.startswith(MAY_CHANGE)]
    if refused:
        raise recipes.RecipeError(
            f"cannot change {', '.join(refused)} when resuming (it changes shapes, the data "
            f"order or the optimizer); start a new run from the recipe instead")
    return [f"{k} changed from {a.get(k)} to {b.get(k)}: the learning-rate schedule follows "
            f"the new length" for k in changed if k in SCHEDULE]


def run_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint folder belongs to (RUN/checkpoints/NAME), or None."""
    parent = checkpoint.parent
    if parent.name == "checkpoints" and (parent.parent / "recipe.yaml").is_file():
        return parent.parent
    return None


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows logged after `step` (a crash came before their checkpoint), rewriting
    the file atomically; returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _step(line) is not None and _step(line) <= step]
    if len(keep) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(lines) - len(keep)


def _step(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None       # a line cut off by a crash
    return step if isinstance(step, int) else None


def set_aside_later(run_dir: Path, step: int) -> list[str]:
    """Rename the run's checkpoints of steps after `step` to NAME.superseded: resuming from
    an earlier checkpoint abandons them, and a later `--resume RUN` must not pick them."""
    moved = []
    for folder in checkpoint.checkpoints(run_dir):
        if (checkpoint.step_of(folder) or 0) > step:
            target = folder.with_name(folder.name.removesuffix(".old") + ".superseded")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(folder, target)
            moved.append(folder.name)
    return moved
