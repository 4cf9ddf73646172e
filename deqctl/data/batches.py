"""Batching from in-memory splits: deterministic shuffles, resumable positions, and
tensor-op augmentation.

All randomness comes from local torch.Generators seeded by a hash of (seed, epoch[, batch]),
never the global RNG, so a run resumed at batch k of an epoch sees exactly the batches
(and augmentations) an uninterrupted run would.
"""

from __future__ import annotations

from typing import Iterator

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


def augment_batch(x: torch.Tensor, *, pad: int, flip: bool,
                  generator: torch.Generator) -> torch.Tensor:
    """Return a randomly cropped (zero padding `pad`, then a crop of the original size at
    a random offset per sample) and, when `flip`, randomly horizontally flipped copy of
    the batch x (B, C, H, W), or (B, H, W) for digits read as rows. Same generator state
    -> same result."""
    if x.dim() == 3:
        return augment_batch(x.unsqueeze(1), pad=pad, flip=flip, generator=generator).squeeze(1)
    b, c, h, w = x.shape
    # draw everything up front, in a fixed order, so results depend only on the generator
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
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
                    epoch: int = 0, start: int = 0, augment: bool = False,
                    drop_last: bool = False, device: torch.device | str = "cpu",
                    with_index: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """Return an iterator over (x, y) batches of one epoch, from batch `start` on.

    x on `device`: uint8 pixels become float32 in [0, 1], token ids stay int64, values
    stay float32; y as stored (int64 classes or tokens, float32 values). With
    `shuffle`, the order is a pure function of (seed, epoch); with `augment`, each batch's
    augmentation is a pure function of (seed, epoch, batch index). So batches `start`,
    `start + 1`, ... are identical to those of a full pass from 0. `with_index` yields
    (x, y, index) instead, index holding the examples' positions in the split (int64, on
    `device`).
    Raises ValueError (eagerly, not at the first next()) for a bad `start`.
    """
    total = num_batches(split, batch_size, drop_last)
    if not 0 <= start <= total:
        raise ValueError(f"start must be in [0, {total}] (batches per epoch), got {start}")
    return _batches(split, batch_size, total, shuffle, seed, epoch, start, augment,
                    torch.device(device), with_index)


def _batches(split: Split, batch_size: int, total: int, shuffle: bool, seed: int,
             epoch: int, start: int, augment: bool, device: torch.device, with_index: bool
             ) -> Iterator[tuple[torch.Tensor, ...]]:
    """The generator behind iterate_batches (arguments already checked)."""
    order = epoch_order(len(split), seed, epoch) if shuffle else None
    augment = augment and split.augment is not None
    pad, flip = padding_for(split), split.augment == "shift+flip"
    for i in range(start, total):
        lo, hi = i * batch_size, min((i + 1) * batch_size, len(split))
        idx = order[lo:hi] if order is not None else slice(lo, hi)
        x, y = split.inputs[idx], split.targets[idx]
        if augment:
            # augment on the CPU so results are identical whatever the device
            x = augment_batch(x, pad=pad, flip=flip,
                              generator=_generator(_AUGMENT, seed, epoch, i))
        x = x.to(device)
        if x.dtype == torch.uint8:   # moved as uint8 (4x fewer bytes), converted on the device
            x = x.to(torch.float32).div_(255.0)
        if with_index:
            index = idx if order is not None else torch.arange(lo, hi)
            yield x, y.to(device), index.to(device)
        else:
            yield x, y.to(device)
