"""A DEQ unrolled to a fixed number of solver iterations: a plain feed-forward module that
torch.export and the ONNX exporter can trace (no data-dependent loop, no host sync).

Both solvers use only ops every exporter handles: Anderson's small least-squares system
is solved by an unrolled Cholesky factorisation written with elementwise ops instead of
torch.linalg, which the ONNX exporter cannot translate.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..implicit import SolveSpec
from ..models import DEQModel
from ..solvers import Packing, State, packing_of
from ..solvers.anderson import anderson_step

UNROLLABLE = ("fixed_point", "anderson")


class Unrolled(nn.Module):
    """x -> decode(z_N), z_N after `iters` applications of the cell from init_state.

    `model` should have its normalisations folded (see fold_norms). Knobs mirror the
    recipe's: damping for fixed_point; m, lam, beta for anderson.
    """

    def __init__(self, model: DEQModel, iters: int,
                 solver: Literal["fixed_point", "anderson"] = "fixed_point", *,
                 damping: float = 1.0, m: int = 5, lam: float = 1e-4, beta: float = 1.0):
        super().__init__()
        if solver not in UNROLLABLE:
            raise ValueError(f"cannot unroll solver {solver!r} (valid: {', '.join(UNROLLABLE)})")
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        self.model, self.iters, self.solver = model, int(iters), solver
        self.damping, self.m, self.lam, self.beta = float(damping), int(m), float(lam), float(beta)

    @classmethod
    def from_spec(cls, model: DEQModel, iters: int, s: SolveSpec) -> "Unrolled":
        """Return the unrolled model for the solve settings `s` (its solver and knobs)."""
        return cls(model, iters, s.solver, **s.options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.model.inject(x)
        z = self.model.init_state(u)
        if self.solver == "fixed_point":
            for _ in range(self.iters):
                fz = self.model.cell(z, u)
                z = fz if self.damping == 1.0 else _state(
                    tuple(a + self.damping * (b - a) for a, b in zip(_parts(z), _parts(fz))), z)
        else:
            z = self._anderson(z, u)
        return self.model.decode(z, x)

    def _anderson(self, z: State, u: torch.Tensor) -> State:
        """The steps of deqctl.solvers.anderson, without early stopping: keep the last m
        f-values F and residuals G, move to F^T alpha - (1 - beta) G^T alpha."""
        packing = packing_of(z) or Packing([z])
        zf = packing.pack(z if isinstance(z, (tuple, list)) else [z])
        fs: list[torch.Tensor] = []
        gs: list[torch.Tensor] = []
        for _ in range(self.iters):
            fz = packing.pack(_parts(self.model.cell(_state(packing.unpack(zf), z), u)))
            g = fz - zf
            fs, gs = (fs + [fz])[-self.m:], (gs + [g])[-self.m:]
            if len(gs) == 1:
                zf = fz if self.beta == 1.0 else zf + self.beta * g
                continue
            F, G = torch.stack(fs, 1), torch.stack(gs, 1)                 # (B, n, D)
            # the library's step (its second, larger-ridge solve left out: it would double
            # the exported graph for a case that the ridge already makes rare)
            zf, _ = anderson_step(F, G, torch.bmm(G, G.transpose(1, 2)), lam=self.lam,
                                  beta=self.beta, newest=len(gs) - 1, solve=_solve_spd,
                                  retry=False)
        return _state(packing.unpack(zf), z)


def _parts(z: State) -> tuple[torch.Tensor, ...]:
    return tuple(z) if isinstance(z, (tuple, list)) else (z,)


def _state(parts: tuple[torch.Tensor, ...], like: State) -> State:
    """`parts` in the form of `like`: a tuple, or the one tensor."""
    return parts if isinstance(like, (tuple, list)) else parts[0]


def _solve_spd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve a w = 1 for a batch of small SPD matrices a (B, n, n) by Gauss-Jordan
    elimination without pivoting (stable for SPD matrices), unrolled over the n pivots
    with whole-matrix ops only: torch.linalg has no ONNX translation, and
    elementwise-unrolled factorisations make graphs too large to export quickly. Returns
    (w (B, n), ok): a zero pivot gives inf/NaN, which anderson_step checks."""
    n = a.shape[-1]
    b = torch.ones_like(a[:, :, :1])
    m = torch.cat([a, b], dim=2)                                     # augmented (B, n, n+1)
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    for k in range(n):
        row = m[:, k:k + 1, :] / m[:, k:k + 1, k:k + 1]              # pivot row, scaled
        # one rank-1 update clears column k elsewhere and puts the scaled row at k
        m = m - (m[:, :, k:k + 1] - eye[:, k:k + 1]) * row
    w = m[:, :, n]
    return w, torch.ones_like(w[:, 0], dtype=torch.bool)


@torch.no_grad()
def calibrate_iters(model: DEQModel, x: torch.Tensor, s: SolveSpec) -> tuple[int, float]:
    """Return (solver updates the settings `s` take on x, fraction of samples converged).

    The library's N-th evaluation measures the residual of the iterate z_{N-1}, which it
    returns (or an earlier, better one): an unrolled model reproduces that with N - 1
    updates. When some sample never reaches tol, N is max_iter.
    """
    model.eval()
    u = model.inject(x)
    z0 = model.init_state(u)
    # check every evaluation, whole batch: the count must be exact, not rounded up
    res = s.but(check_every=1, compact=False).run(lambda z: model.cell(z, u), z0)
    return max(res.nfe - 1, 1), float(res.converged.float().mean())
