"""Anderson acceleration with an incrementally updated Gram matrix.

With history F = [f(z_i)] and G = [f(z_i) - z_i], each step picks weights alpha minimising
||G^T alpha||^2 + lam ||alpha||^2 subject to sum(alpha) = 1, which is
alpha = w / sum(w) with (G G^T + lam * s I) w = 1 (s: mean of diag(G G^T)), and moves to
z = X^T alpha + beta G^T alpha = F^T alpha - (1 - beta) G^T alpha (one pass over the
history when beta = 1, which is why F is stored rather than X). Only the new row of G G^T
is computed per step (m dot products, not m^2), and the SPD system goes through a no-sync
Cholesky, so nothing here waits for the host.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval

from ..limits import HISTORY_LIMIT
from .registry import SOLVERS
from .tracker import Tracker


def _weights(gram: torch.Tensor, ridge: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (gram + ridge I) w = 1 per sample; returns (alpha, ok) without a host sync."""
    n = gram.shape[-1]
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + ridge[:, None, None] * eye)
    ones = torch.ones(gram.shape[0], n, 1, dtype=gram.dtype, device=gram.device)
    w = torch.cholesky_solve(ones, chol).squeeze(-1)
    alpha = w / w.sum(dim=1, keepdim=True)
    ok = (info == 0) & torch.isfinite(alpha).all(dim=1)
    return alpha, ok


@SOLVERS.register("anderson")
def anderson(tr: Tracker, z: torch.Tensor, *,
             m: Annotated[int, Interval(ge=1, le=HISTORY_LIMIT)] = 5,
             lam: Annotated[float, Ge(0)] = 1e-4,
             beta: Annotated[float, Interval(gt=0, le=1)] = 1.0) -> None:
    """Anderson-accelerated fixed-point iteration; results live in the tracker.
    `m`: history size; `lam`: ridge, relative to the mean diagonal of the Gram matrix;
    `beta`: mixing between f-values and iterates."""
    b, d = z.shape
    F = z.new_empty(b, m, d)   # a slot is written before anything reads it
    G = z.new_empty(b, m, d)
    gram = z.new_zeros(b, m, m)
    k = 0
    while True:
        slot, n = k % m, min(k + 1, m)
        fz, g = tr.evaluate(z, g_out=G[:, slot])
        if tr.finished():
            return
        F[:, slot] = fz
        # (1, D) @ (D, n) rather than (n, D) @ (D, 1): ~4x faster on CPU (see broyden._apply)
        row = torch.bmm(g.unsqueeze(1), G[:, :n].transpose(1, 2)).squeeze(1)   # (b, n)
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        if n == 1:
            z_next = fz if beta == 1.0 else z + beta * g
        else:
            a = _mix_weights(tr, gram[:, :n, :n], lam, slot).unsqueeze(1)
            z_next = torch.bmm(a, F[:, :n]).squeeze(1)
            if beta != 1.0:
                z_next = z_next - (1 - beta) * torch.bmm(a, G[:, :n]).squeeze(1)
        z = tr.freeze(z_next, z)
        k += 1
        z, F, G, gram = tr.compact_state(z, F, G, gram)


def _mix_weights(tr: Tracker, gram: torch.Tensor, lam: float, newest: int) -> torch.Tensor:
    """Least-squares weights with two fallbacks, chosen per sample on the device.

    A singular or non-finite system (the classic "singular U" crash) retries with a ridge
    scaled to the Gram matrix, and failing that takes a plain fixed-point step.
    """
    # The ridge is relative to the Gram scale, so lam means the same at any residual size.
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).nan_to_num(0.0, 0.0, 0.0) + 1e-30
    alpha, ok = _weights(gram, lam * scale)
    alpha2, ok2 = _weights(gram, max(lam, 1e-2) * scale)
    plain = torch.zeros_like(alpha)
    plain[:, newest] = 1.0
    tr.count_fallback(~ok)
    return torch.where(ok[:, None], alpha, torch.where(ok2[:, None], alpha2, plain))
