"""Models by name. A model is a `DEQModel`; `build_model` rebuilds one from a recipe and
the data's description alone, which is all a checkpoint stores."""

from __future__ import annotations

from typing import Callable

from ..recipe import Recipe
from .base import DEQModel, ModelOutput
from .image import ResNetDEQ

MODELS: dict[str, Callable[..., DEQModel]] = {"resnet_deq": ResNetDEQ}


class ModelError(ValueError):
    """A recipe names a model that does not exist or does not fit the data."""


def build_model(recipe: Recipe, data_info: dict) -> DEQModel:
    """Instantiate recipe.model.name for data described by `data_info` (DataInfo.as_dict())."""
    name = recipe.model.name
    if name not in MODELS:
        raise ModelError(f"model.name: unknown model {name!r} (valid: {', '.join(MODELS)})")
    if recipe.model.dropout and recipe.deq.forward.compact:
        raise ModelError("model.dropout > 0 draws one mask for the whole batch per forward pass; "
                         "it cannot be combined with deq.forward.compact=true")
    return MODELS[name](recipe.model, data_info, recipe.deq)


__all__ = ["build_model", "MODELS", "DEQModel", "ModelOutput", "ModelError"]
