"""Models by name. A model is a `DEQModel`; `build_model` rebuilds one from a recipe and
the data's description alone, which is all a checkpoint stores.

A new built-in is one module of this package defining a DEQModel subclass registered
with `@MODELS.register("name")`: every module here is imported below, so nothing else
changes; a user's model needs no edit here at all (`model.name: PATH.py:Class`, or an
entry point in group `deqctl.models`)."""

from __future__ import annotations

from typing import Any

from ..data import DataInfo
from ..implicit import DEQ
from ..options import Block, options_block
from ..registry import Part, import_builtins
from .base import DEQModel, ModelError, ModelOutput
from .baselines import baseline_for
from .registry import MODELS

import_builtins(__name__, __path__)

_BLOCKS: dict[tuple[str, int], type[Block]] = {}


def model_block(part: Part) -> type[Block]:
    """The `model` block of a recipe choosing `part`: `name` and its constructor's options."""
    key = (part.ref, id(part.obj))
    if key not in _BLOCKS:
        _BLOCKS[key] = options_block(part.obj, 2, f"model {part.ref}", name=part.ref)
    return _BLOCKS[key]


def options_of(block: Block) -> dict[str, Any]:
    """A validated `model` block as the model's keyword arguments (values as validated:
    a nested block stays a block)."""
    return {k: getattr(block, k) for k in type(block).model_fields if k != "name"}


def build_model(recipe, info: DataInfo) -> DEQModel:
    """Instantiate the recipe's model for data described by `info`, with the DEQ layer the
    recipe's `deq` block describes (deq.mode=baseline: the data's classic explicit network
    in its place). Raises ModelError (one line) when they do not fit."""
    if recipe.deq.mode == "baseline":
        return baseline_for(info, DEQ(recipe.deq))
    part = recipe.part("model")
    cls, name = part.obj, part.ref
    if info.inputs not in cls.inputs or info.task not in cls.tasks:
        fits = [n for n in MODELS.builtins if info.inputs in MODELS.get(n).obj.inputs
                and info.task in MODELS.get(n).obj.tasks]
        raise ModelError(f"model.name={name} takes {'/'.join(cls.inputs)} inputs for "
                         f"{'/'.join(cls.tasks)}; data {info.name} is {info.inputs} for "
                         f"{info.task} (use {' or '.join(fits) or 'another source'})")
    try:
        model = cls(info, DEQ(recipe.deq), **options_of(recipe.model))
    except ValueError as exc:
        if part.user_code:       # the user's code raised: said as theirs, with its line
            raise
        raise ModelError(str(exc)) from exc
    if recipe.deq.forward.compact and not model.per_sample:
        raise ModelError(f"model.name={name} couples the samples of a batch (model.dropout > 0 "
                         f"draws one mask for the whole batch per forward pass); it cannot be "
                         f"combined with deq.forward.compact=true")
    return model


__all__ = ["build_model", "model_block", "MODELS", "DEQModel", "ModelOutput", "ModelError"]
