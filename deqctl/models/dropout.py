"""Variational dropout for DEQ cells: one mask per forward pass, shared by every f call of
the solve and its backward, so the solver iterates one fixed map."""

from __future__ import annotations

import torch


def variational_mask(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """A dropout mask drawn once per forward pass and shared by every f call of the solve
    and its backward: the solver then iterates one fixed map (a fresh mask per call, as
    nn.Dropout draws, moves the fixed point under the solver). Drawn in float32 whatever
    `like`'s dtype: torch.bernoulli draws other masks for other dtypes from the same seed,
    and the gradient audit's float64 copy must solve the map the training pass solved."""
    keep = 1.0 - p
    draw = torch.full(shape, keep, dtype=torch.float32, device=like.device)
    return torch.bernoulli(draw).to(like.dtype) / keep


def dropout(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x * mask, or x when there is no mask (evaluation, p = 0)."""
    return x if mask is None else x * mask


