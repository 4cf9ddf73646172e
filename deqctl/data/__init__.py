"""Data sources by name, held in memory, and deterministic batching.

    bundle = build_data(recipe.data)          # DataBundle(info, train, test, val, notes)
    for x, y in iterate_batches(bundle.train, 64, shuffle=True, seed=0, epoch=e, start=k):
        ...                                   # typed batches: see deqctl.data.base

A new source is one loader `f(data_settings, like) -> DataBundle` added to SOURCES (and
its settings block to deqctl.recipe.DataSettings); `like`, the description of the data a
trained model saw, matters to sources that fit something to their data (a vocabulary).
"""

from __future__ import annotations

from typing import Callable

from ..errors import quote
from .arrays import load_npz
from .base import DataBundle, DataError, DataInfo, Split, channel_stats
from .batches import augment_batch, epoch_order, iterate_batches, num_batches
from .hf import load_hf
from .images import load_imagefolder, load_mnist_5k, load_sequential_mnist, load_torchvision
from .series import load_co2, load_csv
from .text import Tokenizer, load_shakespeare, load_text

Loader = Callable[..., DataBundle]

SOURCES: dict[str, Loader] = {
    "mnist-5k": load_mnist_5k,
    "sequential-mnist": load_sequential_mnist,
    "mnist": load_torchvision,
    "fashion-mnist": load_torchvision,
    "cifar10": load_torchvision,
    "imagefolder": load_imagefolder,
    "shakespeare": load_shakespeare,
    "text": load_text,
    "npz": load_npz,
    "co2": load_co2,
    "csv": load_csv,
    "hf": load_hf,
}

def build_data(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return the data named by data.name, with data.limit_train applied to train and
    data.limit_eval to test and val (first N samples of each).

    `like` is the description of the data a model was trained on: a text is then
    tokenized with that model's vocabulary, and the data must fit the model.
    Raises DataError (one line) for an unknown name, data that cannot be found or read,
    or data that does not fit `like`.
    """
    if cfg.name not in SOURCES:
        raise DataError(f"data.name: unknown source {quote(cfg.name)} (valid: {', '.join(SOURCES)})")
    bundle = SOURCES[cfg.name](cfg, like)
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


__all__ = ["DataError", "DataInfo", "Split", "DataBundle", "SOURCES", "Tokenizer", "build_data",
           "num_batches", "iterate_batches", "augment_batch", "epoch_order", "channel_stats"]
