"""Checkpoints: safetensors for every tensor, YAML/JSON for everything else, so nothing
is ever unpickled from a file someone might have been sent.

A checkpoint folder holds
  model.safetensors   weights
  recipe.yaml         the resolved recipe (rebuilds the model)
  meta.json           data description, step, epoch, last metrics
  tokenizer.json      a word, bpe or file tokenizer, as Hugging Face `tokenizers` reads
                      it (its sha256 in meta.json: an edited or swapped file is refused)
  trainer.safetensors optimizer tensors and RNG states   (training checkpoints only)
  trainer.json        optimizer scalars, scheduler, data position
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import recipe as recipes
from ..data import DataInfo
from ..data.tokenize import BUILT_IN
from ..errors import quote, user_frame
from ..files import FileRefused, is_regular, read_json, read_text
from ..models import DEQModel, ModelError, build_model
from . import usercode
from .bundle import bundle_metadata, read_bundle
from . import rundir
from .rundir import (CHECKPOINTS, META, RECIPE, TOKENIZER, TRAINER_SCALARS, TRAINER_TENSORS,
                     WEIGHTS, is_run, live_holder)

JSON_LIMIT = 16 * 2**20     # meta.json, trainer.json: kilobytes in practice
TOKENIZER_LIMIT = 2**26     # DataInfo.vocab's bound; GPT-2's is 1.4 MB, WikiText-103's words 6 MB


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
        save_file(state, tmp / WEIGHTS)
        (tmp / RECIPE).write_text(recipes.dump(recipe))
        data_info, tokenizer = _without_tokenizer(data_info)
        if tokenizer is not None:
            (tmp / TOKENIZER).write_text(tokenizer, encoding="utf-8")
            meta = {**meta, "tokenizer_sha256": _sha256(tokenizer)}
        (tmp / META).write_text(json.dumps({"data_info": data_info, **meta}, indent=2))
        if trainer is not None:
            tensors, scalars = trainer["tensors"], trainer["json"]
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
                      tmp / TRAINER_TENSORS)
            (tmp / TRAINER_SCALARS).write_text(json.dumps(scalars, indent=2))
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


def _without_tokenizer(data_info: dict) -> tuple[dict, str | None]:
    """(data_info without the tokenizer.json text, that text): a word, bpe or file
    tokenizer is saved as its own file, which `tokenizers.Tokenizer.from_file` opens."""
    if data_info.get("tokenizer") in (None, *BUILT_IN) or not data_info.get("vocab"):
        return data_info, None
    return {k: v for k, v in data_info.items() if k != "vocab"}, data_info["vocab"]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_meta_json(folder: Path) -> Any:
    """meta.json of a checkpoint with its data description whole: the tokenizer.json
    beside it put back as `vocab`, once its sha256 matches the one meta.json recorded.
    CheckpointError when that file is missing, altered or from another run."""
    meta = read_json(folder / META, JSON_LIMIT)
    if not isinstance(meta, dict) or "tokenizer_sha256" not in meta:
        return meta
    path = folder / TOKENIZER
    try:
        text = read_text(path, TOKENIZER_LIMIT)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the model's tokenizer)") from None
    except (OSError, ValueError) as exc:     # too large, not a regular file, not UTF-8
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if _sha256(text) != meta["tokenizer_sha256"]:
        raise CheckpointError(f"{path}: not the tokenizer this model was trained with "
                              f"(edited, or from another run); restore the checkpoint's own")
    if isinstance(meta.get("data_info"), dict):
        meta["data_info"]["vocab"] = text
    return meta


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
        step = read_json(folder / META, JSON_LIMIT).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if is_count(step) else None


def is_count(value: object) -> bool:
    """A non-negative integer (not a boolean): what every stored count must be."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders of a run, in training order: by the step recorded
    inside each (not by name or file time, which copies change), `final` last among equals.
    A save in progress or cut off (NAME.tmp) is skipped; NAME.old stands in for NAME when
    a crash came between the two renames of a save."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = {}
    for c in folder.iterdir():
        if c.suffix not in ("", ".old") or not (c / WEIGHTS).is_file():
            continue          # NAME.tmp: a save in progress; NAME.superseded*: set aside
        name = c.stem if c.suffix == ".old" else c.name
        if c.suffix == ".old" and (folder / name).exists():
            continue
        step = step_of(c)
        if step is not None:
            found[c] = (step, name == "final", c.stat().st_mtime)
    return sorted(found, key=found.get)



def is_finished(run_dir: str | Path) -> bool:
    """True when a run's last checkpoint is `final` and holds its final evaluation."""
    found = checkpoints(run_dir)
    if not found or found[-1].name != "final":
        return False
    try:
        return isinstance(read_json(found[-1] / META, JSON_LIMIT).get("metrics"), dict)
    except (OSError, ValueError, AttributeError):
        return False

def _existing(path: str | Path) -> Path:
    """`path` as a Path; CheckpointError (one line) when there is nothing there."""
    p = Path(path)
    try:
        if not p.exists():
            raise CheckpointError(f"{quote(str(p))}: no such run directory or checkpoint")
    except OSError as exc:        # a name too long, a loop of links
        raise CheckpointError(f"{quote(str(p))}: {exc.strerror or exc}") from None
    return p


def resolve(path: str | Path) -> Path:
    """Map a run directory or a checkpoint folder to the checkpoint folder to load: for a
    run, the checkpoint of the latest step (`final` among equals)."""
    p = _existing(path)
    if (p / WEIGHTS).is_file():
        return p
    found = checkpoints(p)
    if found:
        return found[-1]
    raise CheckpointError(f"{p}: not a run directory or checkpoint (no complete checkpoint found)")


def read_meta(folder: Path, trust_code: bool = False, overrides: list[str] = ()
              ) -> tuple[recipes.Recipe, dict]:
    """Return (recipe, meta) of a checkpoint folder, `overrides` (key=value) applied to
    its recipe. A recipe naming user code imports it only with `trust_code` (else
    CheckpointError saying so), found where the run recorded it, and warns when that
    source has changed since."""
    try:
        meta = _read_meta_json(folder)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: meta.json missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: meta.json is unreadable ({exc})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("data_info"), dict)
            and is_count(meta.get("step"))):
        raise CheckpointError(f"{folder}: meta.json is malformed (needs data_info and a "
                              f"step >= 0)")
    if meta.get("metrics") is not None and not isinstance(meta["metrics"], dict):
        raise CheckpointError(f"{folder}: meta.json is malformed (metrics is not a mapping)")
    recipe = stored_recipe(_raw_recipe(folder), folder, meta.get("code"), trust_code, overrides)
    return recipe, meta


def _raw_recipe(folder: Path) -> Any:
    try:
        return recipes.load_raw(folder / RECIPE)
    except recipes.RecipeError as exc:
        raise CheckpointError(f"{folder}: stored recipe is unreadable: {exc}") from None


def read_settings(folder: Path) -> tuple[dict[str, Any], DataInfo]:
    """(the stored recipe, parsed but not validated, and the data description) of a
    checkpoint: enough to compare runs, importing nothing a run names."""
    try:
        meta = _read_meta_json(folder)
        info = DataInfo.from_dict(meta.get("data_info") if isinstance(meta, dict) else None)
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{folder}: meta.json is unreadable or malformed ({exc})") from None
    raw = _raw_recipe(folder)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{folder}: stored recipe is not a mapping")
    return raw, info


def stored_recipe(raw: Any, where: Path, code: Any, trust_code: bool,
                  overrides: list[str] = ()) -> recipes.Recipe:
    """The recipe stored in a checkpoint folder or export file `where` (`code`: its
    user-code records), with `overrides` applied; CheckpointError (one line) when it is
    invalid or names user code without `trust_code` (a bad override: RecipeError)."""
    try:
        raw = recipes.apply_overrides(recipes.migrate(raw), list(overrides))
        recipe = recipes.validate(raw, source="overrides" if overrides else "recipe",
                                  bases=usercode.bases(code), trust=trust_code)
    except recipes.RecipeTrustError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except recipes.RecipeError as exc:
        if overrides:
            raise
        raise CheckpointError(f"{where}: stored recipe is invalid: {exc}") from None
    usercode.check(recipe.user_code(), code, where)
    return recipe


def load_model(path: str | Path, overrides: list[str] = (), device: str | torch.device = "cpu",
               trust_code: bool = False) -> tuple[DEQModel, recipes.Recipe, dict]:
    """Rebuild the model of a run or checkpoint; returns (model in eval mode, recipe, meta).

    `overrides` (key=value) are applied to the stored recipe first, e.g. deq.eval.max_iter=8.
    """
    folder = resolve(path)
    recipe, meta = read_meta(folder, trust_code, overrides)
    model = rebuild(recipe, meta["data_info"], folder / WEIGHTS, folder, device)
    return model, recipe, meta


def open_model(path: str | Path, overrides: list[str] = (), device: str | torch.device = "cpu",
               trust_code: bool = False) -> tuple[DEQModel, recipes.Recipe, DataInfo]:
    """Return (model in eval mode, resolved recipe, data description) for a run directory,
    a checkpoint folder, a checkpoint's model.safetensors or a `deqctl export --format
    safetensors` file. `overrides` (key=value) apply to the stored recipe; user code it
    names is imported only with `trust_code`.

    Raises CheckpointError (one line) for anything else.
    """
    p = _existing(path)
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
            if p.name != WEIGHTS or not rundir.is_checkpoint(p.parent):
                raise CheckpointError(f"{p}: a safetensors file without deqctl's metadata, and "
                                      f"not a checkpoint's model.safetensors; deqctl reads run "
                                      f"dirs, checkpoints and `deqctl export --format "
                                      f"safetensors` files")
            return open_model(p.parent, overrides, device, trust_code)
        try:
            raw, info, code = read_bundle(p)
        except recipes.RecipeError as exc:
            raise CheckpointError(f"{p}: stored recipe is invalid: {exc}") from None
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        recipe = stored_recipe(raw, p, code, trust_code, overrides)
        model = rebuild(recipe, info, p, p, device)
        return model, recipe, model.info
    for attempt in range(3):
        try:
            model, recipe, meta = load_model(p, list(overrides), device, trust_code)
            return model, recipe, model.info
        except (CheckpointError, FileNotFoundError):
            # a run in progress may replace its checkpoint while it is read: read again
            if attempt == 2 or not is_run(p) or live_holder(p) is None:
                raise
            time.sleep(0.2)


def rebuild(recipe: recipes.Recipe, data_info: dict, weights: Path, where: Path,
            device: str | torch.device = "cpu") -> DEQModel:
    """Build the recipe's model for the stored data description (DataInfo.as_dict()) and
    load the safetensors file `weights` into it (eval mode, on `device`); CheckpointError
    naming `where` when the description or the weights do not fit the model.

    The model is first built on the meta device and its tensors compared with the file's
    header, so a stored recipe asking for a huge model (a damaged or hostile file) is
    refused before any memory is allocated: memory stays bounded by the file's own size.
    """
    try:
        info = DataInfo.from_dict(data_info)
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: stored data description is unreadable ({exc})") from None
    try:
        with torch.device("meta"):
            shapes = _shapes(build_model(recipe, info))
    except ModelError as exc:      # a stored recipe and data description that do not fit
        raise CheckpointError(f"{where}: {exc}") from None
    except (RuntimeError, TypeError, IndexError, ValueError) as exc:   # ... or do not build
        if user_frame(exc) is not None:       # a trusted user model's own bug: theirs
            raise
        raise CheckpointError(f"{where}: the stored recipe and data description do not "
                              f"build a model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:80] if str(exc) else ''})") from None
    check_header(_header(weights), shapes, where)
    state = _finite_weights(weights, where, device)
    model = build_model(recipe, info)
    model.load_state_dict(state)
    return model.to(device).eval()


def load_weights(folder: Path, model: torch.nn.Module, device: str | torch.device = "cpu"
                 ) -> dict[str, Any]:
    """Load a checkpoint's weights into `model` (built from its recipe); returns its meta.
    CheckpointError when they do not fit it or hold NaN/inf."""
    weights = folder / WEIGHTS
    check_header(_header(weights), _shapes(model), folder)
    model.load_state_dict(_finite_weights(weights, folder, device))
    return _read_meta_json(folder)


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _load_regular(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """safetensors' load_file, for a regular file only (a FIFO would block it)."""
    if not is_regular(path):
        raise FileRefused(f"{path}: missing or not a regular file")
    return load_file(path, device=device)


def _finite_weights(weights: Path, where: Path, device: str | torch.device
                    ) -> dict[str, torch.Tensor]:
    try:
        state = _load_regular(weights, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable ({exc})") from None
    for name, got in state.items():
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{where}: tensor {name} holds NaN or inf values "
                                  f"(a diverged run); use an earlier checkpoint")
    return state


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _header(weights: Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{name: (shape, dtype)} from a safetensors file's header, without reading tensors."""
    try:
        if not is_regular(weights):
            raise FileRefused(f"{weights}: missing or not a regular file")
        with safe_open(str(weights), framework="pt") as fh:
            return {k: (tuple(fh.get_slice(k).get_shape()),
                        _DTYPES.get(fh.get_slice(k).get_dtype(), fh.get_slice(k).get_dtype()))
                    for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable ({exc})") from None


def check_header(header: dict[str, tuple], expected: dict[str, tuple], where: Path) -> None:
    """CheckpointError (one line) unless `header` ({name: (shape, dtype)}) has exactly
    the expected tensors, with their shapes and dtypes."""
    missing, unexpected = expected.keys() - header.keys(), header.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the recipe's model "
                              f"(missing {len(missing)}, unexpected {len(unexpected)} tensors, "
                              f"e.g. {sorted(missing or unexpected)[0]})")
    for name, (shape, dtype) in expected.items():
        got_shape, got_dtype = header[name]
        if got_shape != shape or got_dtype != dtype:
            raise CheckpointError(f"{where}: tensor {name} is {got_dtype} {got_shape}, the "
                                  f"recipe's model needs {dtype} {shape}")


def load_trainer(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (tensors, scalars) saved by a training checkpoint."""
    try:
        tensors = _load_regular(folder / TRAINER_TENSORS)
        scalars = read_json(folder / TRAINER_SCALARS, JSON_LIMIT)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: trainer state missing or corrupt, cannot resume "
                              f"({exc})") from None
    if not isinstance(scalars, dict):
        raise CheckpointError(f"{folder}: trainer.json is malformed (not a mapping)")
    return tensors, scalars
