"""Data sources by name, held in memory, and deterministic batching.

    bundle = build_data(recipe.data)          # DataBundle(info, train, test, val, notes)
    for x, y in iterate_batches(bundle.train, 64, shuffle=True, seed=0, epoch=e, start=k):
        ...                                   # typed batches: see deqctl.data.base

A new built-in source is one module: a loader `f(settings, like) -> DataBundle` registered
with `@source("name", SettingsBlock)`; every module here is imported below. A user's source needs no edit at
all: `data.name: PATH.py:function` returning the arrays an .npz holds (deqctl.data.registry).
`like`, the description of the data a trained model saw, matters to sources that fit
something to their data (a vocabulary).
"""

from __future__ import annotations

from ..options import Block, options_block
from ..registry import Part, import_builtins
from .arrays import function_source
from .base import DataBundle, DataError, DataInfo, Split, channel_stats
from .batches import augment_batch, epoch_order, iterate_batches, num_batches
from .registry import SOURCES, Source
from .settings import ArraysData, DataBase
from .tokenize import Tokenizer

import_builtins(__name__, __path__)       # every source module registers itself

_BLOCKS: dict[tuple[str, int], type[Block]] = {}


def data_block(part: Part) -> type[Block]:
    """The `data` block of a recipe choosing `part`: `name`, the keys every source takes,
    and the source's own (a user function's: its keyword arguments, and the npz keys)."""
    key = (part.ref, id(part.obj))
    if key not in _BLOCKS:
        if isinstance(part.obj, Source):
            block = options_block(lambda: None, 0, f"data {part.ref}", name=part.ref,
                                  base=part.obj.settings)
            block.__source__ = part.obj
        else:
            block = options_block(part.obj, 0, f"data {part.ref}", name=part.ref,
                                  base=ArraysData)
            block.__source__ = Source(function_source(part.obj, part.ref), block)
        _BLOCKS[key] = block
    return _BLOCKS[key]


def build_data(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return the data `cfg` (a validated `data` block) names, with data.limit_train
    applied to train and data.limit_eval to test and val (first N samples of each).

    `like` is the description of the data a model was trained on: a text is then
    tokenized with that model's vocabulary, and the data must fit the model.
    Raises DataError (one line) for data that cannot be found or read, or that does not
    fit `like`.
    """
    bundle = type(cfg).__source__.load(cfg, like)
    for part in ("train", "val", "test"):
        split = getattr(bundle, part)
        if split is not None and len(split) == 0:
            raise DataError(f"{bundle.info.name}: the {part} split holds no samples")
    if like is not None:
        diff = like.fits(bundle.info)
        if diff:
            raise DataError(f"data {bundle.info.name} does not fit a model trained on "
                            f"{like.name} ({'; '.join(diff)})")
    head = (lambda s, n: s.head(n) if s is not None else None)
    return DataBundle(info=bundle.info, train=head(bundle.train, cfg.limit_train),
                      test=bundle.test.head(cfg.limit_eval), val=head(bundle.val, cfg.limit_eval),
                      notes=bundle.notes, facts=bundle.facts)


__all__ = ["DataError", "DataInfo", "DataBase", "Split", "DataBundle", "SOURCES", "Source",
           "Tokenizer", "build_data", "data_block", "num_batches", "iterate_batches",
           "augment_batch", "epoch_order", "channel_stats"]
