"""Weight and spectral normalisation of the cell's layers (torch parametrisations, so
`torch.nn.utils.parametrize.remove_parametrizations` folds them for export)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrizations

Norm = Literal["weight", "spectral", "none"]     # how a cell's linear maps are normalised


def normalised(layer: nn.Module, kind: str, init_std: float | None = None) -> nn.Module:
    """Return `layer` with weight norm ('weight'), spectral norm ('spectral') or as is,
    after an optional N(0, init_std) init (done first, so weight norm's g matches it)."""
    if init_std is not None:
        with torch.no_grad():
            layer.weight.normal_(0.0, init_std)
    if kind == "weight":
        return parametrizations.weight_norm(layer)
    if kind == "spectral":
        return parametrizations.spectral_norm(layer)
    return layer
