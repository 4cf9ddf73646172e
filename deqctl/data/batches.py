"""Batching: deterministic shuffles, resumable positions, tensor-op augmentation, and
each rank's slice of a batch; splits of image files are decoded by deqctl.data.loader.

All randomness comes from local torch.Generators seeded by a hash of (seed, epoch[, batch]),
never the global RNG, so a run resumed at batch k of an epoch sees exactly the batches
(and augmentations) an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .base import Split

# distinct streams so the shuffle and the augmentation never share random numbers
_SHUFFLE, _AUGMENT = 0, 1
_MASK64 = (1 << 64) - 1


def _generator(*parts: int) -> torch.Generator:
    """Return a CPU generator seeded from all `parts` (any Python ints).

    SeedSequence hashes its entropy, so nearby (seed, epoch) pairs give unrelated streams
    (unlike seed + epoch, where seed=0/epoch=1 equals seed=1/epoch=0). Each part is
    split into exactly two 32-bit words so that parts of different sizes cannot alias.
    """
    words = []
    for p in parts:
        p &= _MASK64  # negative seeds map to distinct non-negative ones
        words += [p & 0xFFFFFFFF, p >> 32]
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)  # 63 bits: always accepted


def num_batches(split: Split, batch_size: int, drop_last: bool) -> int:
    """Return the number of batches in one pass over `split`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(split)
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Return the shuffled sample order of `epoch`: a permutation of range(n) that depends
    only on (seed, epoch)."""
    return torch.randperm(n, generator=_generator(_SHUFFLE, seed, epoch, 0))


def padding_for(split: Split) -> int:
    """Return the shift range used by augmentation: 4 pixels for 32x32 (or larger)
    photographs, the CIFAR convention; 2 otherwise (digits are only 28 pixels wide and sit
    near the centre, so larger shifts start cutting strokes off)."""
    h, w = split.inputs.shape[-2:]
    return 4 if split.augment == "shift+flip" and min(h, w) >= 32 else 2


def augment_batch(x: torch.Tensor, *, pad: int, flip: bool, generator: torch.Generator,
                  of: int | None = None, at: int = 0) -> torch.Tensor:
    """Return a randomly cropped (zero padding `pad`, then a crop of the original size at
    a random offset per sample) and, when `flip`, randomly horizontally flipped copy of
    the batch x (B, C, H, W), or (B, H, W) for digits read as rows. Same generator state
    -> same result. x may be samples at..at+B of a batch of `of` (a rank's slice): they
    get exactly what they would get as part of the whole batch."""
    if x.dim() == 3:
        return augment_batch(x.unsqueeze(1), pad=pad, flip=flip, generator=generator,
                             of=of, at=at).squeeze(1)
    b, c, h, w = x.shape
    # draw everything up front, in a fixed order, so results depend only on the generator
    n = b if of is None else of
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)[:, at:at + b]
    flips = (torch.rand(n, generator=generator) < 0.5)[at:at + b]
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))  # zeros; works on uint8
        rows = offsets[0, :, None] + torch.arange(h)  # (B, H)
        cols = offsets[1, :, None] + torch.arange(w)  # (B, W)
        batch = torch.arange(b)[:, None, None]
        # channels-last so one advanced index gathers every crop: (B, H, W, C)
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2)
    if flip:
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def iterate_batches(split: Split, batch_size: int, *, shuffle: bool, seed: int = 0,
                    epoch: int = 0, start: int = 0, augment: bool | str = False,
                    drop_last: bool = False, device: torch.device | str = "cpu",
                    with_index: bool = False, shard: tuple[int, int] = (0, 1)
                    ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Return an iterator over (x, y) batches of one epoch, from batch `start` on.

    x on `device`: uint8 pixels become float32 in [0, 1], token ids stay int64, values
    stay float32; y as stored (int64 classes or tokens, float32 values). With
    `shuffle`, the order is a pure function of (seed, epoch); with `augment` (truthy:
    the split's own kind), each batch's augmentation is a pure function of (seed, epoch,
    batch index), ImageNet's of (seed, epoch, sample index). So batches `start`,
    `start + 1`, ... are identical to those of a full pass from 0. `with_index` yields
    (x, y, index) instead, index holding the examples' positions in the split (int64, on
    `device`). `shard` = (rank, world): only rank's contiguous slice of each batch is
    read (and decoded), exactly that slice of the whole batch.
    Raises ValueError (eagerly, not at the first next()) for a bad `start`.
    """
    total = num_batches(split, batch_size, drop_last)
    if not 0 <= start <= total:
        raise ValueError(f"start must be in [0, {total}] (batches per epoch), got {start}")
    return _batches(split, batch_size, total, shuffle, seed, epoch, start, bool(augment),
                    torch.device(device), with_index, shard)


class Lazy(Sequence):
    """A sequence whose items are made as they are asked for. An epoch's batches are:
    planned up front, a tensor each, those of 1 GB of text at batch 16 (181,000) held
    123 MB that grew with the data."""

    def __init__(self, n: int, item: Callable[[int], object]):
        self.n, self.item = n, item

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int):
        if not 0 <= k < self.n:
            raise IndexError(k)
        return self.item(k)


def _part(n: int, shard: tuple[int, int]) -> slice:
    """Rank's contiguous part of a batch of n (as deqctl.engine.distributed.shard)."""
    rank, world = shard
    return slice(n * rank // world, n * (rank + 1) // world)


def _batches(split: Split, batch_size: int, total: int, shuffle: bool, seed: int,
             epoch: int, start: int, augment: bool, device: torch.device, with_index: bool,
             shard: tuple[int, int]) -> Iterator[tuple[torch.Tensor, ...]]:
    """The generator behind iterate_batches (arguments already checked)."""
    order = epoch_order(len(split), seed, epoch) if shuffle else None
    augment = augment and split.augment is not None
    pad, flip = padding_for(split), split.augment == "shift+flip"

    def planned(k: int) -> tuple[int, torch.Tensor | slice, int, int]:
        """Batch start + k: (its index, this rank's samples, the batch's size, their offset)."""
        i = start + k
        lo, hi = i * batch_size, min((i + 1) * batch_size, len(split))
        part = _part(hi - lo, shard)
        idx = order[lo:hi][part] if order is not None else slice(lo + part.start, lo + part.stop)
        return i, idx, hi - lo, part.start

    plan = Lazy(total - start, planned)
    decode = getattr(split.inputs, "decode_batches", None)
    if decode is not None:        # image files: decoded here or in worker processes
        def positions(k: int) -> torch.Tensor:
            idx = plan[k][1]
            return torch.arange(idx.start, idx.stop) if isinstance(idx, slice) else idx

        xs = decode(Lazy(len(plan), positions),
                    (seed, epoch) if augment and split.augment == "imagenet" else None,
                    pin=device.type == "cuda")
    else:
        xs = (split.inputs[idx] for _, idx, _, _ in plan)
    for (i, idx, size, at), x in zip(plan, xs):
        y = split.targets[idx]
        if augment and split.augment != "imagenet":
            # augment on the CPU so results are identical whatever the device
            x = augment_batch(x, pad=pad, flip=flip, generator=_generator(_AUGMENT, seed, epoch, i),
                              of=size, at=at)
        x = x.to(device, non_blocking=device.type == "cuda" and x.is_pinned())
        if x.dtype == torch.uint8:   # moved as uint8 (4x fewer bytes), converted on the device
            x = x.to(torch.float32).div_(255.0)
        if with_index:
            index = idx if order is not None else torch.arange(idx.start, idx.stop)
            yield x, y.to(device), index.to(device)
        else:
            yield x, y.to(device)
