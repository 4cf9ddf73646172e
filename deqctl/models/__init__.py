"""Models by name. A model is a `DEQModel`; `build_model` rebuilds one from a recipe and
the data's description alone, which is all a checkpoint stores."""

from __future__ import annotations

from ..errors import quote
from ..data import DataInfo
from ..implicit import DEQ
from ..recipe import Recipe
from .base import DEQModel, ModelOutput
from .image import ResNetDEQ
from .mdeq import MDEQ
from .tcn import TcnDEQ
from .transformer import TransformerDEQ

MODELS: dict[str, type[DEQModel]] = {"resnet_deq": ResNetDEQ, "mdeq": MDEQ,
                                     "transformer_deq": TransformerDEQ, "tcn_deq": TcnDEQ}


class ModelError(ValueError):
    """A recipe names a model that does not exist or does not fit the data."""


def build_model(recipe: Recipe, info: DataInfo) -> DEQModel:
    """Instantiate recipe.model.name for data described by `info`, with the DEQ layer the
    recipe's `deq` block describes. Raises ModelError (one line) when they do not fit."""
    name = recipe.model.name
    if name not in MODELS:
        raise ModelError(f"model.name: unknown model {quote(name)} (valid: {', '.join(MODELS)})")
    cls = MODELS[name]
    if info.inputs not in cls.inputs or info.task not in cls.tasks:
        fits = [n for n, c in MODELS.items() if info.inputs in c.inputs and info.task in c.tasks]
        raise ModelError(f"model.name={name} takes {'/'.join(cls.inputs)} inputs for "
                         f"{'/'.join(cls.tasks)}; data {info.name} is {info.inputs} for "
                         f"{info.task} (use {' or '.join(fits) or 'another source'})")
    if recipe.model.dropout and recipe.deq.forward.compact:
        raise ModelError("model.dropout > 0 draws one mask for the whole batch per forward pass; "
                         "it cannot be combined with deq.forward.compact=true")
    try:
        return cls(recipe.model, info, DEQ(**recipe.deq.layer_kwargs()), recipe.deq.warm_start)
    except ValueError as exc:
        raise ModelError(str(exc)) from None


__all__ = ["build_model", "MODELS", "DEQModel", "ModelOutput", "ModelError"]
