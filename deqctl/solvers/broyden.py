"""Limited-memory (good) Broyden's method on g(z) = f(z) - z.

The inverse Jacobian of g is approximated as Binv = -I + sum_i u_i v_i^T with at most
`history` rank-one terms, so memory is 2 * history * B * D values however many iterations
run (full-history Broyden keeps 2 * max_iter). When the buffers are full the memory
restarts from Binv = -I: each u_i is a Sherman-Morrison correction of the Binv built from
all terms before it, so overwriting the oldest term (a ring buffer) leaves an inverse that
matches no secant condition, and the iteration can diverge. Each step reuses Binv g from the
previous one, so one update reads the buffers four times.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Interval

from ..limits import HISTORY_LIMIT
from .registry import SOLVERS
from .tracker import Tracker


def _apply(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Binv x = -x + U^T (V x) for batched buffers U, V of shape (b, n, D).

    Written as row vector times matrix, (1, D) @ (D, n) then (1, n) @ (n, D): the CPU
    kernels stream the long D axis contiguously that way, about 6x faster than the
    matrix-times-column form (b, n, D) @ (D, 1).
    """
    row = x.unsqueeze(1)
    coeff = torch.bmm(row, V.transpose(1, 2))             # (b, 1, n)
    return torch.baddbmm(row, coeff, U, beta=-1).squeeze(1)


def _apply_t(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x^T Binv = -x + V^T (U x)."""
    return _apply(V, U, x)


@SOLVERS.register("broyden")
def broyden(tr: Tracker, z: torch.Tensor, *,
            history: Annotated[int, Interval(ge=1, le=HISTORY_LIMIT)] = 8,
            line_search: bool = False, ls_steps: Annotated[int, Interval(ge=1, le=60)] = 3
            ) -> None:
    """Broyden root finding on f(z) - z; results live in the tracker. `history`: rank-one
    updates kept (limited memory); `ls_steps`: step halvings tried by the line search."""
    b, d = z.shape
    U = z.new_zeros(b, history, d)
    V = z.new_zeros(b, history, d)
    _, g = tr.evaluate(z)
    step = g.clone()                                       # -Binv g with Binv = -I
    k = 0
    while not tr.finished():
        z, g, step, U, V = tr.compact_state(z, g, step, U, V)
        n = k % history                                    # live terms; 0 = (re)start
        z_new, g_new = _step(tr, z, g, step, line_search, ls_steps)
        if g_new is None:                                  # budget spent inside the search
            break
        dz, dg = z_new - z, g_new - g
        binv_gnew = _apply(U[:, :n], V[:, :n], g_new)
        # Binv g = -step, except right after a restart, where the step came from the
        # discarded memory and Binv is -I again.
        binv_dg = binv_gnew + (step if n else g)
        v = _apply_t(U[:, :n], V[:, :n], dz)
        den = (v * dg).sum(dim=1, keepdim=True)
        # A frozen sample has dz = 0; a tiny denominator would blow the update up.
        usable = torch.isfinite(den) & (den.abs() > 1e-30)
        u = torch.where(usable, (dz - binv_dg) / torch.where(usable, den, 1.0), 0.0)
        v = torch.where(usable, v, 0.0)
        U[:, n], V[:, n] = u, v
        step = -(binv_gnew + u * (v * g_new).sum(dim=1, keepdim=True))
        z, g, k = z_new, g_new, k + 1
    if tr.index is None:          # rows still line up with the batch (not compacted)
        live = (k - 1) % history + 1 if k else 0
        tr.inverse = (U[:, :live], V[:, :live])


def shine_adjoint(inverse: tuple[torch.Tensor, torch.Tensor], grad: torch.Tensor
                  ) -> torch.Tensor:
    """SHINE (Ramzi et al., 2022): the adjoint y = (I - J)^-T grad from Broyden's estimate
    Binv of (J - I)^-1 instead of a solve: y = -Binv^T grad, for a (B, D) grad."""
    U, V = inverse
    return -_apply_t(U, V, grad)


def _step(tr: Tracker, z, g, step, line_search: bool, ls_steps: int):
    """Move along `step`; with line search, halve it per sample while ||g|| grows
    (at most `ls_steps` times, and only while some sample's residual grew).

    Every trial is a real f evaluation and is counted; returns (z_new, g_new), or
    (z, None) if the evaluation budget ran out mid-search.
    """
    z_new = tr.freeze(z + step, z)
    _, g_new = tr.evaluate(z_new)
    if not line_search:
        return z_new, g_new
    g_norm = torch.linalg.vector_norm(g, dim=1)
    scale = torch.ones_like(g_norm)
    for _ in range(ls_steps):
        worse = torch.linalg.vector_norm(g_new, dim=1) > g_norm
        if not bool(worse.any()):   # host sync, only with line search: skips useless trials
            break
        if tr.nfe >= tr.max_iter:
            return z, None
        scale = torch.where(worse, scale * 0.5, scale)
        trial = tr.freeze(z + scale[:, None] * step, z)
        _, g_trial = tr.evaluate(trial)
        w = worse[:, None]
        z_new, g_new = torch.where(w, trial, z_new), torch.where(w, g_trial, g_new)
    return z_new, g_new
