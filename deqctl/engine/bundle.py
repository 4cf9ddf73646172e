"""The format of `deqctl export --format safetensors`: one self-contained file holding the
model's weights, with the resolved recipe and the data description in the safetensors
header metadata.

The weights are stored exactly as trained (weight norm not folded), so the file rebuilds
the full DEQ with its solver, and `deqctl.load` returns a model equal to the checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__
from .. import recipe as recipes

FORMAT = "deqctl-model/1"


def save_bundle(path: str | Path, model: torch.nn.Module, recipe: recipes.Recipe,
                data_info: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write weights + recipe + data_info (DataInfo.as_dict()) to one safetensors file;
    returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "deqctl_version": __version__, "recipe": recipes.dump(recipe),
            "data_info": json.dumps(data_info), "extra": json.dumps(extra or {})}
    save_file(state, str(path), metadata=meta)
    return path


def bundle_metadata(path: str | Path) -> dict[str, str] | None:
    """Return the header metadata of a deqctl safetensors export, or None when the file is
    plain safetensors (e.g. a checkpoint's model.safetensors). Raises ValueError if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    return meta if meta.get("format") == FORMAT else None


def read_bundle(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Return (the stored recipe as parsed YAML, data_info, user-code records) of a
    safetensors export.

    The header may have been written by anyone: ValueError (one line) for a missing or
    malformed field, RecipeError for a recipe that is not valid, too large or hostile YAML."""
    meta = bundle_metadata(path)
    if meta is None:
        raise ValueError(f"{path}: safetensors file without deqctl metadata")
    missing = [k for k in ("recipe", "data_info") if not isinstance(meta.get(k), str)]
    if missing:
        raise ValueError(f"{path}: deqctl metadata lacks {', '.join(missing)}")
    info, extra = (_json(meta.get(k) or "{}", k, path) for k in ("data_info", "extra"))
    if not isinstance(info, dict):
        raise ValueError(f"{path}: data_info in the metadata is not a mapping")
    raw = recipes.parse(meta["recipe"], f"{path} (stored recipe)")
    return raw, info, extra.get("code") if isinstance(extra, dict) else None


def _json(text: str, key: str, path: str | Path) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{path}: {key} in the metadata is nested too deeply") from None
    except ValueError:
        raise ValueError(f"{path}: {key} in the metadata is not valid JSON") from None
