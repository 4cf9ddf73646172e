"""Folding weight / spectral normalisation into plain weights, for export."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize


def fold_norms(model: nn.Module) -> nn.Module:
    """Return a deep copy of `model` in which every parametrisation (weight norm, spectral
    norm) is replaced by the plain weight it currently computes; `model` is untouched.

    Spectral norm in eval mode does no power-iteration update, so the folded weight is
    exactly the one the eager model uses at test time.
    """
    folded = copy.deepcopy(model)
    for module in folded.modules():
        if not parametrize.is_parametrized(module):
            continue
        # A deep copy shares the dynamically created Parametrized<Layer> class with the
        # original, and remove_parametrizations deletes the weight property from that
        # class, which would break the original model. Give the copy its own class first.
        cls = module.__class__
        own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, own)
        for name in list(module.parametrizations.keys()):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return folded
