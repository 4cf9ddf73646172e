"""The Python API for using trained models: `deqctl.load(path)`.

    model = deqctl.load("runs/mnist-deq")       # run dir, checkpoint folder or .safetensors export
    logits = model(images)                      # float32 images in [0, 1], shape (N, C, H, W)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import recipe as recipes
from .engine import checkpoint
from .engine.checkpoint import CheckpointError
from .models import DEQModel


def load_with_recipe(path: str | Path, overrides: list[str] = (),
                     device: str | torch.device = "cpu"
                     ) -> tuple[DEQModel, recipes.Recipe, dict[str, Any]]:
    """Return (model in eval mode, resolved recipe, data_info) for a run directory, a
    checkpoint folder, a checkpoint's model.safetensors or a `deqctl export --format
    safetensors` file. `overrides` (key=value) apply to the stored recipe.

    Raises CheckpointError (one line) for anything else.
    """
    # imported here: deqctl.export builds on deqctl.inspect, which builds on this module
    from .export.bundle import bundle_metadata, read_bundle

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
            return load_with_recipe(p.parent, overrides, device)
        state, recipe, data_info = read_bundle(p, overrides)
        return checkpoint.rebuild(recipe, data_info, state, p, device), recipe, data_info
    model, recipe, meta = checkpoint.load_model(p, list(overrides), device=device)
    return model, recipe, meta["data_info"]


def load(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Return the model stored at `path` (run dir, checkpoint folder or safetensors
    export) in eval mode. It takes the data's raw inputs (images as float32 in [0, 1],
    (N, C, H, W)) and returns logits, solving its fixed point with the recipe's eval settings.
    """
    return load_with_recipe(path, device=device)[0]
