"""Datasets by name, held in memory as uint8 tensors, and deterministic batching.

    bundle = build_data(recipe.data)          # DataBundle(info, train, test, val)
    for x, y in iterate_batches(bundle.train, 64, shuffle=True, seed=0, epoch=e, start=k):
        ...                                   # x float32 [0, 1] (B, C, H, W), y int64

A new dataset is one loader `f(DataSettings) -> DataBundle` added to DATASETS.
"""

from __future__ import annotations

from typing import Callable

from ..recipe import DataSettings
from .base import DataBundle, DataError, DataInfo, Split, channel_stats
from .batches import augment_batch, epoch_order, iterate_batches, num_batches
from .images import load_cifar10, load_fashion_mnist, load_mnist, load_mnist_5k

DATASETS: dict[str, Callable[[DataSettings], DataBundle]] = {
    "mnist-5k": load_mnist_5k,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}


def build_data(cfg: DataSettings) -> DataBundle:
    """Return the dataset named by data.name, with data.limit_train applied to train and
    data.limit_eval to test and val (first N samples of each).

    Raises DataError (one line) for an unknown name or data that cannot be found.
    """
    if cfg.name not in DATASETS:
        raise DataError(f"data.name: unknown dataset {cfg.name!r} "
                        f"(valid: {', '.join(DATASETS)})")
    bundle = DATASETS[cfg.name](cfg)
    val = bundle.val.head(cfg.limit_eval) if bundle.val is not None else None
    return DataBundle(info=bundle.info, train=bundle.train.head(cfg.limit_train),
                      test=bundle.test.head(cfg.limit_eval), val=val)


__all__ = ["DataError", "DataInfo", "Split", "DataBundle", "DATASETS", "build_data",
           "num_batches", "iterate_batches", "augment_batch", "epoch_order",
           "channel_stats"]
