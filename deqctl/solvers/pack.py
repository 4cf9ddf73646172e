"""States made of several tensors (an MDEQ's branches at several resolutions, say) as one
(B, D) tensor, so every solver, residual and trace treats them as a single state: the
residual is over all parts together."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

State = torch.Tensor | tuple[torch.Tensor, ...]


class Packing:
    """How a tuple of batch-first tensors lies in one flat (B, D) tensor."""

    def __init__(self, parts: Sequence[torch.Tensor]):
        if not parts or any(p.shape[0] != parts[0].shape[0] for p in parts):
            raise ValueError("a state of several tensors needs at least one, all with the "
                             "same batch size")
        self.shapes = [tuple(p.shape[1:]) for p in parts]
        self.sizes = [math.prod(s) for s in self.shapes]

    def pack(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    def unpack(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        chunks = torch.split(flat, self.sizes, dim=1)
        return tuple(c.reshape(flat.shape[0], *s) for c, s in zip(chunks, self.shapes))

    def wrap(self, f: Callable) -> Callable:
        """f(parts, *args) -> parts, as a map of the packed state."""
        def packed(z: torch.Tensor, *args):
            return self.pack(f(self.unpack(z), *args))
        return packed


def packing_of(z: State) -> Packing | None:
    """The Packing of a tuple or list state; None for a plain tensor."""
    return Packing(z) if isinstance(z, (tuple, list)) else None
