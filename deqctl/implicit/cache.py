"""A per-example fixed-point cache: each training example's last z*, kept across epochs, is
where its next solve starts. The weights move little between two visits of an example,
so its old fixed point is usually a far better start than zeros (fewer forward
iterations), and unlike a warm start from the previous batch it belongs to the same input."""

from __future__ import annotations

import torch

from ..solvers import State


def _tensors(z: State) -> tuple[torch.Tensor, ...]:
    return tuple(z) if isinstance(z, (tuple, list)) else (z,)


class FixedPointCache:
    """z* per example index, on the device of the states; empty until the first store."""

    def __init__(self, size: int):
        self.size = size
        self.states: tuple[torch.Tensor, ...] | None = None
        self.filled: torch.Tensor | None = None     # (size,) bool: a finite z* is stored

    def start(self, index: torch.Tensor, z0: State) -> State:
        """z0 with the rows of examples seen before replaced by their cached z*."""
        if self.states is None:
            return z0
        hit = self.filled[index]
        out = tuple(torch.where(hit.view(-1, *[1] * (z.dim() - 1)), s[index].to(z.dtype), z)
                    for s, z in zip(self.states, _tensors(z0), strict=True))
        return out if isinstance(z0, (tuple, list)) else out[0]

    def store(self, index: torch.Tensor, z: State) -> None:
        """Remember z* (detached) for these examples; non-finite rows are not kept."""
        zs = [t.detach() for t in _tensors(z)]
        if self.states is None:
            self.states = tuple(t.new_zeros(self.size, *t.shape[1:]) for t in zs)
            self.filled = torch.zeros(self.size, dtype=torch.bool, device=zs[0].device)
        if [s.shape[1:] for s in self.states] != [t.shape[1:] for t in zs]:
            raise ValueError("deq.cache_fixed_points needs every example's state to have one "
                             "shape (e.g. one sequence length)")
        finite = torch.stack([t.flatten(1).isfinite().all(1) for t in zs]).all(0)
        for s, t in zip(self.states, zs):
            s[index] = torch.where(finite.view(-1, *[1] * (t.dim() - 1)), t, s[index])
        self.filled[index] |= finite

    def tensors(self, prefix: str = "fpcache.") -> dict[str, torch.Tensor]:
        """The cache as named tensors (a checkpoint's trainer state: resume is bit-exact)."""
        if self.states is None:
            return {}
        return {f"{prefix}filled": self.filled,
                **{f"{prefix}{i}": s for i, s in enumerate(self.states)}}

    def load(self, tensors: dict[str, torch.Tensor], prefix: str = "fpcache.") -> None:
        if f"{prefix}filled" not in tensors:
            return
        self.filled = tensors[f"{prefix}filled"]
        n = sum(1 for k in tensors if k.startswith(prefix)) - 1
        self.states = tuple(tensors[f"{prefix}{i}"] for i in range(n))
