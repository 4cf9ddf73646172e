"""Variational dropout for DEQ cells: one mask per forward pass, shared by every f call of
the solve and its backward, so the solver iterates one fixed map."""

from __future__ import annotations

import torch


def variational_mask(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """A dropout mask drawn once per forward pass and shared by every f call of the solve
    and its backward: the solver then iterates one fixed map (a fresh mask per call, as
    nn.Dropout draws, moves the fixed point under the solver)."""
    keep = 1.0 - p
    return torch.bernoulli(torch.full(shape, keep, dtype=like.dtype, device=like.device)) / keep


def dropout(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x * mask, or x when there is no mask (evaluation, p = 0)."""
    return x if mask is None else x * mask


