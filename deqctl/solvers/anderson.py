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

from typing import Annotated, Callable

import torch
from annotated_types import Ge, Interval

from ..limits import HISTORY_LIMIT
from .registry import SOLVERS
from .tracker import Tracker


def cholesky_solve(system: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve system w = 1 for a batch of SPD matrices by a no-sync Cholesky; returns
    (w (b, n), ok (b,)): ok is False where the factorisation failed."""
    chol, info = torch.linalg.cholesky_ex(system)
    ones = torch.ones(*system.shape[:2], 1, dtype=system.dtype, device=system.device)
    return torch.cholesky_solve(ones, chol).squeeze(-1), info == 0


def anderson_step(F: torch.Tensor, G: torch.Tensor, gram: torch.Tensor, *, lam: float,
                  beta: float, newest: int, solve: Callable = cholesky_solve,
                  retry: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One Anderson update from the history F = [f(z_i)], G = [f(z_i) - z_i] (b, n, D) and
    its Gram matrix G G^T (b, n, n): the weights alpha = w / sum(w), (gram + lam s I) w = 1
    (s: the mean of diag(gram), so lam means the same at any residual size), and the move
    to F^T alpha - (1 - beta) G^T alpha. A singular or non-finite system retries with a
    larger ridge (`retry`), and failing that takes a plain fixed-point step from the
    `newest` entry, chosen per sample on the device. Returns (z_next (b, D), fell back).

    The solver and export's unrolled graph both take their step here; the graph passes
    an elementwise `solve` (torch.linalg has no ONNX translation) and no retry.
    """
    n = gram.shape[-1]
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1)
    scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale)) + 1e-30

    def weights(ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        w, ok = solve(gram + (ridge * scale)[:, None, None] * eye)
        alpha = w / w.sum(dim=1, keepdim=True)
        return alpha, ok & torch.isfinite(alpha).all(dim=1)

    plain = eye[newest].expand(gram.shape[0], n)
    alpha, ok = weights(lam)
    fallback = plain
    if retry:
        alpha2, ok2 = weights(max(lam, 1e-2))
        fallback = torch.where(ok2[:, None], alpha2, plain)
    alpha = torch.where(ok[:, None], alpha, fallback).unsqueeze(1)
    z_next = torch.bmm(alpha, F).squeeze(1)
    if beta != 1.0:
        z_next = z_next - (1 - beta) * torch.bmm(alpha, G).squeeze(1)
    return z_next, ~ok


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
            z_next, fell_back = anderson_step(F[:, :n], G[:, :n], gram[:, :n, :n], lam=lam,
                                              beta=beta, newest=slot)
            tr.count_fallback(fell_back)
        z = tr.freeze(z_next, z)
        k += 1
        z, F, G, gram = tr.compact_state(z, F, G, gram)
