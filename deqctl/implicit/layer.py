"""The DEQ layer: solve z* = f(z*, u) without a graph, then attach gradients by one of
three rules (implicit differentiation, phantom gradients, Jacobian-free backprop).

    deq = DEQ(forward={"solver": "anderson", "max_iter": 30, "tol": 1e-4},
              backward={"mode": "ift"})
    z, info = deq(cell, u, z0)          # cell(z, u) -> tensor shaped like z

Memory stays independent of the number of solver iterations: the forward solve runs under
no_grad, and only one (ift, jfb) or k (phantom) applications of f are recorded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrize

from ..options import OptionsError
from ..solvers import (CONVERGED, MAX_ITER, ReadoutStop, SolveResult, State, packing_of,
                       shine_adjoint)
from ..solvers.tracker import EPS
from .settings import DEQSettings, deq_settings
from .spec import SolveSpec

Cell = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DEQInfo:
    """Statistics of one DEQ call. `backward` is filled in during loss.backward() (ift)."""

    forward: SolveResult
    backward: SolveResult | None = None
    corrections: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    jac_loss: torch.Tensor | None = None
    backward_steps: int | None = None    # phantom / jfb: the fixed cost of their backward
    depth: int | None = None             # recurrent mode: applications of the cell drawn


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
                  spec: SolveSpec, inverse: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> SolveResult:
    """Solve y = J^T y + grad with the backward settings `spec`. With `inverse` (the forward
    Broyden's estimate of (J - I)^-1), start from the SHINE estimate of y."""
    # Otherwise start at grad, where the first step from y = 0 would land: saves one VJP.
    start = grad
    if inverse is not None:
        flat = grad.reshape(grad.shape[0], -1).to(inverse[0].dtype)
        start = shine_adjoint(inverse, flat).view_as(grad).to(grad.dtype)
    return spec.but(compact=False).run(adjoint_map(z_out, z_in, grad), start)


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


def last_step_result(z: torch.Tensor, prev: torch.Tensor, steps: int, spec: SolveSpec
                     ) -> SolveResult:
    """Statistics of a fixed number of applications of f, as a solve reports them: the
    residual is that of the last application, ||z_K - z_{K-1}|| = ||f(z_{K-1}) - z_{K-1}||,
    which says how far from a fixed point the iteration ends."""
    with torch.no_grad():
        diff = (z - prev).flatten(1).float()
        abs_r = torch.linalg.vector_norm(diff, dim=1)
        rel_r = abs_r / (torch.linalg.vector_norm(z.flatten(1).float(), dim=1) + EPS)
        converged = (rel_r if spec.stop_mode == "rel" else abs_r) <= spec.tol
    n = z.shape[0]
    return SolveResult(
        z=z.detach(), nfe=steps, sample_nfe=torch.full((n,), steps, dtype=torch.int32, device=z.device),
        abs_residual=abs_r, rel_residual=rel_r, converged=converged,
        status=torch.where(converged, CONVERGED, MAX_ITER).to(torch.int32),
        fallbacks=torch.zeros(n, dtype=torch.int32, device=z.device), tol=spec.tol,
        stop_mode=spec.stop_mode)


class DEQ(nn.Module):
    """Fixed-point layer, configured by plain keyword arguments: the blocks of a recipe's
    `deq` section, as dicts (deqctl.implicit.settings holds the schema and its rules).

        DEQ(forward={"solver": "anderson", "max_iter": 30, "tol": 1e-4, "anderson": {"m": 5}},
            backward={"mode": "ift", "max_iter": 30, "tol": 1e-6})

    `forward`: the training solve (solver, max_iter, tol, stop_mode, check_every, compact,
    bf16_until, and the solver's knob block); `backward`: the gradient, `mode` "ift"
    (implicit: solve y = J^T y + g with the block's solver settings), "phantom"
    (`phantom_steps` damped steps of f with `phantom_tau`, differentiated) or "jfb" (one
    step of f, differentiated), `shine` (with a broyden forward: start the adjoint solve
    from its inverse-Jacobian estimate, Ramzi et al. 2022); `eval`: the test-time solve,
    each unset field inherited from `forward`; `jacobian_reg` {weight, every, samples}: a
    Hutchinson estimate of ||df/dz||_F^2 / dim in info.jac_loss for the caller to add to
    its loss; `fp_correction` {states, gamma}: earlier solver states in info.corrections;
    `eval` may also stop each sample on its readout (`stop_mode` kl with `kl_tol`, or
    argmax with `patience`) when the caller passes `readout`;
    `mode` "unrolled" with `unrolled` {depth}: the explicit twin of the same cell,
    back-propagated through every application ("baseline": one application, for a model
    whose cell is a whole explicit network); `mode` "recurrent" with `recurrent` {depth,
    distribution, sigma, backprop, max_depth}: recurrent-depth training, each training
    call applies the cell a number of times drawn from (`seed`, `step`) and back-propagates
    through the last `backprop` applications; evaluation applies it the eval settings'
    max_iter times (the mean depth unless deq.eval.max_iter is set); `pretrain_steps`: that
    twin trains the first N steps of an implicit model (shallow pretraining); `warm_start`.
    Errors name the key and list the valid choices. A validated `DEQSettings` may be passed
    instead.

    Call as `z, info = deq(cell, u, z0)`; `cell(z, u)` must return a tensor shaped like z.
    """

    def __init__(self, settings: DEQSettings | None = None, **kwargs: Any):
        super().__init__()
        if settings is None:
            try:
                settings = deq_settings(kwargs)
            except OptionsError as exc:
                raise ValueError("DEQ: " + "; ".join(exc.lines)) from None
        elif kwargs:
            raise TypeError("DEQ: pass either a DEQSettings or keyword arguments, not both")
        self.settings = settings
        self.fwd_spec, self.bwd_spec, self.eval_spec = settings.specs()
        self.readout_stop = settings.eval.readout_stop()   # None: the residual alone
        b = settings.backward
        self.backward_mode, self.phantom_steps, self.phantom_tau = b.mode, b.phantom_steps, b.phantom_tau
        self.shine = b.shine
        # a baseline's cell does not depend on z: there is no Jacobian to regularise
        self.jacobian_reg = 0.0 if settings.mode == "baseline" else settings.jacobian_reg.weight
        self.jacobian_every, self.jacobian_samples = (settings.jacobian_reg.every,
                                                      settings.jacobian_reg.samples)
        self.fp_correction, self.fp_gamma = settings.fp_correction.states, settings.fp_correction.gamma
        self.mode = settings.mode
        self.unrolled_depth = settings.explicit_depth
        self.pretrain_steps = settings.pretrain_steps
        self.step = 0                      # training calls so far (Jacobian-reg cadence,
                                           # shallow pretraining, recurrent depth draws);
                                           # saved in checkpoints
        self.seed = 0                      # recurrent mode draws from (seed, step); the
                                           # trainer sets the recipe's
        self.last_nfe: int | None = None   # the last training solve's NFE: spreads the
                                           # fixed-point-correction snapshots; saved too

    def forward(self, cell: Cell, u: torch.Tensor, z0: State,
                solver: SolveSpec | None = None, eager_cell: Cell | None = None,
                readout: Callable | None = None) -> tuple[State, DEQInfo]:
        """Return (z, info): z is the fixed point with gradients attached per `backward`;
        `solver` replaces the forward (training) or eval settings for this call. z0 may be
        a tuple of tensors (the cell then maps tuples to tuples): they are solved as one
        state, and z, info.forward.z and the corrections come back as tuples.
        `eager_cell` (the same map, uncompiled) is what the Jacobian regulariser
        differentiates twice when `cell` is a torch.compile'd one, which cannot be.
        `readout(z, idx)`: log-probabilities of the prediction at states z (of samples
        `idx`, None for all); with it, an evaluation solve whose eval settings stop on the
        readout (`readout_stop`) stops each sample once its prediction has settled."""
        rule = self.readout_stop if readout is not None and not self.training else None
        rule = rule and rule.using(readout)
        packing = packing_of(z0)
        if packing is None:
            return self._forward(cell, u, z0, solver, eager_cell or cell, rule)
        rule = rule and rule.on_packed(packing)
        z, info = self._forward(packing.wrap(cell), u, packing.pack(z0), solver,
                                packing.wrap(eager_cell or cell), rule)
        info.forward.z = packing.unpack(info.forward.z)
        info.corrections = [(w, packing.unpack(c)) for w, c in info.corrections]
        return packing.unpack(z), info

    def _forward(self, cell: Cell, u: torch.Tensor, z0: torch.Tensor,
                 solver: SolveSpec | None, eager_cell: Cell, readout: ReadoutStop | None
                 ) -> tuple[torch.Tensor, DEQInfo]:
        fwd = solver or (self.fwd_spec if self.training else self.eval_spec)
        if self.mode == "recurrent":
            depth = self.settings.recurrent_depth(self.seed, self.step) if self.training \
                else fwd.max_iter
            backprop = min(self.settings.recurrent.backprop or depth, depth)
            z, info = self._unrolled(cell, u, z0, fwd, eager_cell, depth, backprop)
            info.depth = depth if self.training else None    # a draw only when training
            return z, info
        if self.mode in ("unrolled", "baseline") or self.pretraining:
            depth = self.unrolled_depth
            return self._unrolled(cell, u, z0, fwd, eager_cell, depth, depth)
        snapshots = self._snapshot_points(fwd) if self.training else ()

        # cached(): weight/spectral norm are computed once per solve, not once per f call,
        # and spectral norm's power iteration cannot change f halfway through a solve.
        with torch.no_grad(), parametrize.cached():
            res = fwd.run(cell_map(cell, u), z0, snapshot_at=snapshots, readout=readout)
        info = DEQInfo(forward=res)
        if self.training:
            self.last_nfe = res.nfe
        if not torch.is_grad_enabled():
            return res.z, info

        z_star = res.z.detach()
        if self.backward_mode == "phantom":
            info.backward_steps = self.phantom_steps
            z_out = z_star
            for _ in range(self.phantom_steps):
                z_out = (1 - self.phantom_tau) * z_out + self.phantom_tau * cell(z_out, u)
        else:   # one application of f recorded at z* (z* itself needs a gradient for ift)
            z_in = z_star.requires_grad_(self.backward_mode == "ift")
            z_out = cell(z_in, u)
            if self.backward_mode == "ift":
                z_out = self._attach_ift(z_out, z_in, info)
            else:
                info.backward_steps = 1
        if self.training and self._jac_due():
            info.jac_loss = self._jacobian_loss(eager_cell, u, z_star)
        if self.training:
            k = len(res.snapshots)
            for i, (_, z_k) in enumerate(sorted(res.snapshots.items())):
                info.corrections.append((self.fp_gamma ** (k - i), cell(z_k.detach(), u)))
            self.step += 1
        return z_out, info

    @contextlib.contextmanager
    def applying(self, depth: int):
        """Within: the unrolled twin applies its cell `depth` times (test-time depth, as
        `eval --sweep-iters` asks of it); its trained depth again after."""
        trained, self.unrolled_depth = self.unrolled_depth, depth
        try:
            yield
        finally:
            self.unrolled_depth = trained

    @property
    def pretraining_left(self) -> int:
        """Training steps still to pretrain unrolled (0 once done, or without pretraining)."""
        return max(0, self.pretrain_steps - self.step)

    @property
    def pretraining(self) -> bool:
        """True while training is in its first deq.pretrain_steps steps, which train the
        cell unrolled (a function of the saved step count: a resume keeps it)."""
        return self.training and self.pretraining_left > 0

    def _unrolled(self, cell: Cell, u: torch.Tensor, z0: torch.Tensor, spec: SolveSpec,
                  eager_cell: Cell, depth: int, backprop: int) -> tuple[torch.Tensor, DEQInfo]:
        """`depth` applications of the cell with gradients through the last `backprop`
        (the twin: all of them; recurrent mode: the first depth - backprop run without a
        graph, as Huginn trains). The solver settings of this call only give the tolerance
        its statistics use."""
        z = prev = z0
        with torch.no_grad():
            for _ in range(depth - backprop):
                prev, z = z, cell(z, u)
        for _ in range(backprop):
            prev, z = z, cell(z, u)
        info = DEQInfo(forward=last_step_result(z, prev, depth, spec))
        if torch.is_grad_enabled():
            info.backward_steps = backprop
            if self.training and self._jac_due():
                info.jac_loss = self._jacobian_loss(eager_cell, u, z.detach())
        if self.training:
            self.step += 1
        return z, info

    def _jacobian_loss(self, cell: Cell, u: torch.Tensor, z_star: torch.Tensor) -> torch.Tensor:
        """Hutchinson estimate of ||df/dz||_F^2 / dim at z_star, on its own application of f:
        the estimate's gradient must reach the weights directly, never through the output
        the IFT hook sits on, which would send it through the adjoint solve (cells whose
        last op saves its output, e.g. tanh, route it there)."""
        z_probe = z_star.detach().requires_grad_()
        # differentiated twice: fused attention kernels have no double backward, math has
        with sdpa_kernel(SDPBackend.MATH):
            f_probe = cell(z_probe, u)
        return hutchinson_jacobian_sq(f_probe, z_probe, self.jacobian_samples).mean() \
            / z_probe[0].numel()

    def _jac_due(self) -> bool:
        return self.jacobian_reg > 0 and self.step % self.jacobian_every == 0

    def _snapshot_points(self, fwd: SolveSpec) -> tuple[int, ...]:
        """Evaluation counts at which to keep iterates for fixed-point correction,
        spread evenly over the previous training solve's length."""
        k = self.fp_correction
        if k == 0:
            return ()
        span = min(self.last_nfe or fwd.max_iter, fwd.max_iter)
        return tuple(sorted({max(1, round(span * (i + 1) / (k + 1))) for i in range(k)}))

    def _attach_ift(self, z_out: torch.Tensor, z_in: torch.Tensor, info: DEQInfo
                    ) -> torch.Tensor:
        """z_out, with the incoming gradient g replaced by the solution of y = J^T y + g
        (J = df/dz at z*) on its way back, so that back-propagating y through the single
        recorded f gives the implicit gradient. Every backward through a retained graph
        gets it; the adjoint solve's own vector-Jacobian products start below it."""
        inverse = info.forward.inverse if self.shine else None
        return _ImplicitGrad.apply(z_out, z_in, info, self.bwd_spec, inverse)


class _ImplicitGrad(torch.autograd.Function):
    """Identity forward; backward solves the IFT adjoint equation. A Function rather than
    a tensor hook: a hook on z_out whose closure holds z_out is a reference cycle through
    the C++ graph that Python's collector cannot see, and it kept every step's graph (and
    the Jacobian estimate's) alive: memory grew by megabytes per training step."""

    @staticmethod
    def forward(ctx, z_out, z_in, info, spec, inverse):
        # z_out is an input of this node, so holding it makes no cycle: this node is
        # owned by its output's consumers, and z_out's graph lies below it.
        ctx.z_out, ctx.z_in, ctx.info, ctx.spec, ctx.inverse = z_out, z_in, info, spec, inverse
        return z_out.view_as(z_out)

    @staticmethod
    def backward(ctx, grad):
        ctx.info.backward = adjoint_solve(ctx.z_out, ctx.z_in, grad, ctx.spec, ctx.inverse)
        return ctx.info.backward.z, None, None, None, None
