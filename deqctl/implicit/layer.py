"""The DEQ layer: solve z* = f(z*, u) without a graph, then attach gradients by one of
three rules (implicit differentiation, phantom gradients, Jacobian-free backprop).

Memory stays independent of the number of solver iterations: the forward solve runs under
no_grad, and only one (ift, jfb) or k (phantom) applications of f are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..recipe import DEQSettings, SolverSettings
from ..solvers import SolveResult, solve

Cell = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DEQInfo:
    """Statistics of one DEQ call. `backward` is filled in during loss.backward() (ift)."""

    forward: SolveResult
    backward: SolveResult | None = None
    corrections: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    jac_loss: torch.Tensor | None = None
    backward_steps: int | None = None    # phantom / jfb: the fixed cost of their backward


def run_solver(f: Callable, z0: torch.Tensor, s: SolverSettings, **extra) -> SolveResult:
    """Solve with the settings of one recipe block (forward, backward or eval)."""
    return solve(f, z0, s.solver, tol=s.tol, max_iter=s.max_iter, stop_mode=s.stop_mode,
                 **s.knobs(), **extra)


def cell_map(cell: Cell, u: torch.Tensor) -> Callable:
    """The map the solvers iterate, f(z, idx) = cell(z, u[idx]): with `compact`, idx
    holds the positions of the samples still running."""
    def f(z: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return cell(z, u if idx is None else u[idx])
    return f


def adjoint_map(z_out: torch.Tensor, z_in: torch.Tensor, grad: torch.Tensor) -> Callable:
    """y -> J^T y + grad, J = df/dz at z*: the IFT adjoint fixed-point map, by vector-Jacobian
    products against the one recorded application z_out = f(z_in). The products couple the
    batch through one graph, so its solve cannot be compacted to a subset of samples."""
    def adjoint(y: torch.Tensor) -> torch.Tensor:
        (vjp,) = torch.autograd.grad(z_out, z_in, y, retain_graph=True)
        return vjp + grad
    return adjoint


def adjoint_solve(z_out: torch.Tensor, z_in: torch.Tensor, grad: torch.Tensor,
                  s: SolverSettings) -> SolveResult:
    """Solve y = J^T y + grad with the backward settings `s`."""
    # Start at grad, where the first step from y = 0 would land: saves one VJP.
    return run_solver(adjoint_map(z_out, z_in, grad), grad, s.model_copy(update={"compact": False}))


def hutchinson_jacobian_sq(f_out: torch.Tensor, z_in: torch.Tensor, samples: int = 1,
                           create_graph: bool = True) -> torch.Tensor:
    """Unbiased per-sample estimate of ||df/dz||_F^2 = E_v ||v^T J||^2, v ~ N(0, I).

    Returns a (B,) tensor, differentiable when create_graph is set.
    """
    total = f_out.new_zeros(f_out.shape[0])
    for _ in range(samples):
        v = torch.randn_like(f_out)
        (vjp,) = torch.autograd.grad(f_out, z_in, v, retain_graph=True, create_graph=create_graph)
        total = total + vjp.flatten(1).pow(2).sum(dim=1)
    return total / samples


class DEQ(nn.Module):
    """Fixed-point layer configured by a recipe's `deq` block.

    Call as `z, info = deq(cell, u, z0)`; `cell(z, u)` must return a tensor shaped like z.
    """

    def __init__(self, settings: DEQSettings):
        super().__init__()
        self.settings = settings
        self.step = 0                      # training calls so far (Jacobian-reg cadence)
        self._last_nfe: int | None = None  # spreads fixed-point-correction snapshots

    def forward(self, cell: Cell, u: torch.Tensor, z0: torch.Tensor,
                solver: SolverSettings | None = None) -> tuple[torch.Tensor, DEQInfo]:
        """Return (z, info): z is the fixed point with gradients attached per deq.backward."""
        s = self.settings
        fwd = solver or (s.forward if self.training else s.eval_settings())
        snapshots = self._snapshot_points(fwd) if self.training else ()

        f = cell_map(cell, u)
        # cached(): weight/spectral norm are computed once per solve, not once per f call,
        # and spectral norm's power iteration cannot change f halfway through a solve.
        with torch.no_grad(), parametrize.cached():
            res = run_solver(f, z0, fwd, snapshot_at=snapshots)
        info = DEQInfo(forward=res)
        if self.training:
            self._last_nfe = res.nfe
        if not torch.is_grad_enabled():
            return res.z, info

        z_star = res.z.detach()
        bwd = s.backward
        jac_due = self.training and self._jac_due()
        if bwd.mode != "ift":
            info.backward_steps = bwd.phantom_steps if bwd.mode == "phantom" else 1
        if bwd.mode == "phantom":
            z_out = z_star
            for _ in range(bwd.phantom_steps):
                z_out = (1 - bwd.phantom_tau) * z_out + bwd.phantom_tau * cell(z_out, u)
        else:   # one application of f recorded at z* (z* itself needs a gradient for ift)
            z_in = z_star.requires_grad_(bwd.mode == "ift" or jac_due)
            z_out = cell(z_in, u)
        if jac_due:
            if bwd.mode == "phantom":
                z_in = z_star.clone().requires_grad_()
                f_in = cell(z_in, u)
            else:
                f_in = z_out
            # Before the IFT hook exists: the hook fires on any gradient through z_out,
            # including these probe products.
            info.jac_loss = hutchinson_jacobian_sq(
                f_in, z_in, s.jacobian_reg.samples).mean() / z_in[0].numel()
        if bwd.mode == "ift":
            self._attach_ift(z_out, z_in, info)
        if self.training:
            gamma, k = s.fp_correction.gamma, len(res.snapshots)
            for i, (_, z_k) in enumerate(sorted(res.snapshots.items())):
                info.corrections.append((gamma ** (k - i), cell(z_k.detach(), u)))
            self.step += 1
        return z_out, info

    def _jac_due(self) -> bool:
        reg = self.settings.jacobian_reg
        return reg.weight > 0 and self.step % reg.every == 0

    def _snapshot_points(self, fwd: SolverSettings) -> tuple[int, ...]:
        """Evaluation counts at which to keep iterates for fixed-point correction,
        spread evenly over the previous training solve's length."""
        k = self.settings.fp_correction.states
        if k == 0:
            return ()
        span = min(self._last_nfe or fwd.max_iter, fwd.max_iter)
        return tuple(sorted({max(1, round(span * (i + 1) / (k + 1))) for i in range(k)}))

    def _attach_ift(self, z_out: torch.Tensor, z_in: torch.Tensor, info: DEQInfo) -> None:
        """Replace the incoming gradient g by the solution of y = J^T y + g (J = df/dz at z*),
        so back-propagating y through the single recorded f gives the implicit gradient."""
        bwd = self.settings.backward

        def hook(grad: torch.Tensor) -> torch.Tensor:
            handle.remove()  # the vector-Jacobian products below must not re-enter this hook
            info.backward = adjoint_solve(z_out, z_in, grad, bwd)
            return info.backward.z

        handle = z_out.register_hook(hook)
