"""Checkpoints: safetensors for every tensor, YAML/JSON for everything else, so nothing
is ever unpickled from a file someone might have been sent.

A checkpoint folder holds
  model.safetensors   weights
  recipe.yaml         the resolved recipe (rebuilds the model)
  meta.json           data description, step, epoch, last metrics
  trainer.safetensors optimizer tensors and RNG states   (training checkpoints only)
  trainer.json        optimizer scalars, scheduler, data position
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import recipe as recipes
from ..data import DataInfo
from ..models import DEQModel, build_model
from .bundle import bundle_metadata, read_bundle


class CheckpointError(ValueError):
    """A path is not a usable run directory or checkpoint; str() says which and why."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (e.g. the disk is full); nothing partial was left."""


def save(folder: Path, model: DEQModel, recipe: recipes.Recipe, data_info: dict,
         meta: dict[str, Any], trainer: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically and durably; returns the folder.

    Everything goes to NAME.tmp first, fsynced; then NAME (if any) becomes NAME.old and
    NAME.tmp becomes NAME. A crash between the two renames leaves NAME.old, which is
    complete and is picked in NAME's place, so the run always has a complete checkpoint.
    """
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        (tmp / "recipe.yaml").write_text(recipes.dump(recipe))
        (tmp / "meta.json").write_text(json.dumps({"data_info": data_info, **meta}, indent=2))
        if trainer is not None:
            tensors, scalars = trainer["tensors"], trainer["json"]
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
                      tmp / "trainer.safetensors")
            (tmp / "trainer.json").write_text(json.dumps(scalars, indent=2))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    except (OSError, SafetensorError) as exc:   # a full disk, a quota, a read-only mount
        shutil.rmtree(tmp, ignore_errors=True)    # leave no debris
        why = getattr(exc, "strerror", None) or exc
        raise CheckpointWriteError(f"cannot write checkpoint {folder} ({why}); "
                                   f"the run's earlier checkpoints are intact") from None
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)          # ENOSPC or EIO here means the data never reached the disk
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):   # folders some systems cannot sync
            raise
    finally:
        os.close(fd)


def step_of(folder: Path) -> int | None:
    """The training step recorded inside a checkpoint, or None if its meta is unreadable."""
    try:
        step = json.loads((folder / "meta.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders of a run, in training order: by the step recorded
    inside each (not by name or file time, which copies change), `final` last among equals.
    A save in progress or cut off (NAME.tmp) is skipped; NAME.old stands in for NAME when
    a crash came between the two renames of a save."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = {}
    for c in folder.iterdir():
        if c.suffix not in ("", ".old") or not (c / "model.safetensors").is_file():
            continue          # NAME.tmp: a save in progress; NAME.superseded: set aside
        name = c.stem if c.suffix == ".old" else c.name
        if c.suffix == ".old" and (folder / name).exists():
            continue
        step = step_of(c)
        if step is not None:
            found[c] = (step, name == "final", c.stat().st_mtime)
    return sorted(found, key=found.get)


def resolve(path: str | Path) -> Path:
    """Map a run directory or a checkpoint folder to the checkpoint folder to load: for a
    run, the checkpoint of the latest step (`final` among equals)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such run directory or checkpoint")
    if (p / "model.safetensors").is_file():
        return p
    found = checkpoints(p)
    if found:
        return found[-1]
    raise CheckpointError(f"{p}: not a run directory or checkpoint (no complete checkpoint found)")


def read_meta(folder: Path) -> tuple[recipes.Recipe, dict]:
    """Return (recipe, meta) of a checkpoint folder."""
    try:
        recipe = recipes.validate(recipes.migrate(recipes.load_raw(folder / "recipe.yaml")),
                                  source=str(folder / "recipe.yaml"))
        meta = json.loads((folder / "meta.json").read_text())
    except recipes.RecipeError as exc:
        raise CheckpointError(f"{folder}: stored recipe is invalid: {exc}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: meta.json missing or corrupt ({exc.__class__.__name__})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("data_info"), dict)
            and step_of(folder) is not None):
        raise CheckpointError(f"{folder}: meta.json is malformed (needs data_info and step)")
    return recipe, meta


def load_model(path: str | Path, overrides: list[str] = (), device: str | torch.device = "cpu"
               ) -> tuple[DEQModel, recipes.Recipe, dict]:
    """Rebuild the model of a run or checkpoint; returns (model in eval mode, recipe, meta).

    `overrides` (key=value) are applied to the stored recipe first, e.g. deq.eval.max_iter=8.
    """
    folder = resolve(path)
    recipe, meta = read_meta(folder)
    if overrides:
        raw = recipes.apply_overrides(recipe.model_dump(mode="json"), list(overrides))
        recipe = recipes.validate(raw, source="overrides")
    try:
        state = load_file(folder / "model.safetensors", device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'model.safetensors'}: unreadable ({exc})") from None
    return rebuild(recipe, meta["data_info"], state, folder, device), recipe, meta


def open_model(path: str | Path, overrides: list[str] = (), device: str | torch.device = "cpu"
               ) -> tuple[DEQModel, recipes.Recipe, DataInfo]:
    """Return (model in eval mode, resolved recipe, data description) for a run directory,
    a checkpoint folder, a checkpoint's model.safetensors or a `deqctl export --format
    safetensors` file. `overrides` (key=value) apply to the stored recipe.

    Raises CheckpointError (one line) for anything else.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix in (".pt2", ".onnx"):
            raise CheckpointError(
                f"{p}: deqctl.load reads run dirs, checkpoints and .safetensors exports; "
                f"open a .pt2 with torch.export.load(path).module(), an .onnx with onnxruntime")
        try:
            is_bundle = bundle_metadata(p) is not None
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        if not is_bundle:        # a checkpoint's own model.safetensors: load its folder
            return open_model(p.parent, overrides, device)
        state, recipe, info = read_bundle(p, overrides)
        return rebuild(recipe, info, state, p, device), recipe, DataInfo.from_dict(info)
    model, recipe, meta = load_model(p, list(overrides), device=device)
    return model, recipe, model.info


def rebuild(recipe: recipes.Recipe, data_info: dict, state: dict[str, torch.Tensor],
            where: Path, device: str | torch.device = "cpu") -> DEQModel:
    """Build the recipe's model for the stored data description (DataInfo.as_dict()) and
    load `state` into it (eval mode, on `device`); CheckpointError naming `where` when the
    description or the weights do not fit the model."""
    try:
        info = DataInfo.from_dict(data_info)
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: stored data description is unreadable ({exc})") from None
    model = build_model(recipe, info)
    check_weights(state, model.state_dict(), where)
    model.load_state_dict(state)
    return model.to(device).eval()


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  where: Path) -> None:
    """CheckpointError (one line) unless `state` has exactly the expected tensors, with
    their shapes and dtypes, all finite."""
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the recipe's model "
                              f"(missing {len(missing)}, unexpected {len(unexpected)} tensors, "
                              f"e.g. {sorted(missing or unexpected)[0]})")
    for name, want in expected.items():
        got = state[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{where}: tensor {name} is {got.dtype} {tuple(got.shape)}, "
                                  f"the recipe's model needs {want.dtype} {tuple(want.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{where}: tensor {name} holds NaN or inf values "
                                  f"(a diverged run); use an earlier checkpoint")


def load_trainer(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (tensors, scalars) saved by a training checkpoint."""
    try:
        return (load_file(folder / "trainer.safetensors"),
                json.loads((folder / "trainer.json").read_text()))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: trainer state missing or corrupt, cannot resume ({exc})") from None
