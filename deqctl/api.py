"""The Python API: `deqctl.load(path)` for trained models, `deqctl.DEQ` for your own.

    model = deqctl.load("runs/mnist-deq")       # run dir, checkpoint folder or .safetensors export
    out = model(x)                              # the data's raw inputs -> the task's output
"""

from __future__ import annotations

from pathlib import Path

import torch

from .engine.checkpoint import open_model


def load(path: str | Path, device: str | torch.device = "cpu", trust_code: bool = False
         ) -> torch.nn.Module:
    """Return the model stored at `path` (run dir, checkpoint folder or safetensors
    export) in eval mode, solving its fixed point with the recipe's eval settings.

    A model, solver or data source the file names by import path is user code: it is
    imported (run) only with `trust_code=True`, as Hugging Face's `trust_remote_code`.

    Raises deqctl.CheckpointError (one line) for anything that is not a usable model:
    a missing, damaged or tampered file, or one built for another version.

    It takes the data's raw inputs (images as float32 in [0, 1] (N, C, H, W); token ids
    int64 (N, L); values float32 (N, L, C) in the data's units) and returns class logits,
    next-token logits (N, L, vocab) or forecasts in the data's units.
    """
    return open_model(path, device=device, trust_code=trust_code)[0]
