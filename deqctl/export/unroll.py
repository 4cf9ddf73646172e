"""A DEQ unrolled to a fixed number of solver iterations: a plain feed-forward module that
torch.export and the ONNX exporter can trace (no data-dependent loop, no host sync).

The graph answers as the library's solve does (deqctl.solvers.tracker), with
elementwise ops instead of control flow: every evaluation measures each sample's residual
(the tracker's definition, in the solve's stop_mode), keeps its lowest-residual iterate,
and freezes a sample once it reaches tol (or turns non-finite) with `torch.where`. The
output decodes each sample's best iterate, so samples that never converge within the
budget get the iterate the eager model returns for them, not the last one.

Both solvers use only ops every exporter handles: Anderson's small least-squares system
is solved by an unrolled Gauss-Jordan elimination written with whole-matrix ops instead of
torch.linalg, which the ONNX exporter cannot translate.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn

from ..implicit import SolveSpec
from ..models import DEQModel
from ..solvers import packing_of
from ..solvers.anderson import anderson_step
from ..solvers.tracker import EPS

UNROLLABLE = ("fixed_point", "anderson")

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Unrolled(nn.Module):
    """x -> decode(z_best): `iters` solver updates from init_state (`iters` + 1 evaluations
    of the cell, as a library solve of max_iter = iters + 1 makes), each sample frozen once
    its residual is within `tol` (`stop_mode` "abs" or "rel") and answered by its
    lowest-residual iterate.

    `model` should have its normalisations folded (see fold_norms). Knobs mirror the
    recipe's: damping for fixed_point; m, lam, beta for anderson.
    """

    def __init__(self, model: DEQModel, iters: int,
                 solver: Literal["fixed_point", "anderson"] = "fixed_point", *,
                 tol: float = 1e-3, stop_mode: Literal["abs", "rel"] = "rel",
                 damping: float = 1.0, m: int = 5, lam: float = 1e-4, beta: float = 1.0):
        super().__init__()
        if solver not in UNROLLABLE:
            raise ValueError(f"cannot unroll solver {solver!r} (valid: {', '.join(UNROLLABLE)})")
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        if stop_mode not in ("abs", "rel"):
            raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
        self.model, self.iters, self.solver = model, int(iters), solver
        self.tol, self.stop_mode = float(tol), stop_mode
        self.damping, self.m, self.lam, self.beta = float(damping), int(m), float(lam), float(beta)

    @classmethod
    def from_spec(cls, model: DEQModel, iters: int, s: SolveSpec) -> "Unrolled":
        """Return the unrolled model for the solve settings `s` (its solver, knobs, tol
        and stop_mode)."""
        return cls(model, iters, s.solver, tol=s.tol, stop_mode=s.stop_mode, **s.options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.model.inject(x)
        z0 = self.model.init_state(u)
        packing = packing_of(z0)
        if packing is None:
            best = self._solve(lambda z: self.model.cell(z, u), z0)
            return self.model.decode(best, x)
        # a state of several tensors is solved as one flat (B, D) state, as solve() does
        best = self._solve(lambda z: packing.pack(self.model.cell(packing.unpack(z), u)),
                           packing.pack(z0))
        return self.model.decode(packing.unpack(best), x)

    def _solve(self, f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
               ) -> torch.Tensor:
        """The tracker's loop with a fixed count: evaluate, keep the best, freeze the
        stopped, step. Returns each sample's best iterate, shaped like z (B, ...)."""
        step = self._fixed_point_step() if self.solver == "fixed_point" else self._anderson_step()
        col = (-1,) + (1,) * (z.dim() - 1)       # a per-sample flag against the state
        best = z
        best_res = z.new_full(z.shape[:1], float("inf"))
        active = torch.ones_like(best_res, dtype=torch.bool)
        for k in range(self.iters + 1):
            fz = f(z)
            g = fz - z
            res = self._residual(fz, g)
            running = active & torch.isfinite(res)
            improved = running & (res < best_res)
            best = torch.where(improved.reshape(col), z, best)
            best_res = torch.where(improved, res, best_res)
            active = running & (res > self.tol)
            if k < self.iters:     # the last evaluation only measures the last iterate
                z = torch.where(active.reshape(col), step(z, fz, g), z)
        return best

    def _residual(self, fz: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-sample residual in the stop mode's measure, as Tracker.evaluate defines it:
        ||g|| (abs) or ||g|| / (||f(z)|| + EPS) (rel), norms over all but the batch axis."""
        r = _norm(g)
        return r if self.stop_mode == "abs" else r / (_norm(fz) + EPS)

    def _fixed_point_step(self) -> Step:
        """deqctl.solvers.fixed_point's move: z + damping * (f(z) - z)."""
        def step(z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return fz if self.damping == 1.0 else z + self.damping * g
        return step

    def _anderson_step(self) -> Step:
        """deqctl.solvers.anderson's move on the flattened state: keep the last m
        f-values F and residuals G, go to F^T alpha - (1 - beta) G^T alpha.

        What differs from the eager solver: when the ridge-regularised system fails (a
        non-finite solution), the graph takes a plain fixed-point step where the solver
        first retries with a larger ridge (that second solve would double the graph for a
        case the ridge already makes rare); and Gauss-Jordan instead of Cholesky, the Gram
        matrix built at once instead of row by row, round differently, which a sample that
        never converges can amplify into another path (and another best iterate). A
        frozen sample's history keeps taking evaluations of its frozen iterate (the
        solver's does too, unless `compact` drops the sample), but its steps are
        discarded, so its answer is its best iterate either way.
        """
        fs: list[torch.Tensor] = []
        gs: list[torch.Tensor] = []

        def step(z: torch.Tensor, fz: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            b = z.shape[0]
            fs.append(fz.reshape(b, -1))
            gs.append(g.reshape(b, -1))
            del fs[:-self.m], gs[:-self.m]
            if len(gs) == 1:
                return fz if self.beta == 1.0 else z + self.beta * g
            F, G = torch.stack(fs, 1), torch.stack(gs, 1)                 # (B, n, D)
            z_next, _ = anderson_step(F, G, torch.bmm(G, G.transpose(1, 2)), lam=self.lam,
                                      beta=self.beta, newest=len(gs) - 1, solve=_solve_spd,
                                      retry=False)
            return z_next.reshape(z.shape)
        return step


def _norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norm over all but the batch axis (the tracker's, which works on
    the (B, D) flattening; reshaping here would cost graph nodes every iteration)."""
    if t.dim() == 1:
        return t.abs()
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())))


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
