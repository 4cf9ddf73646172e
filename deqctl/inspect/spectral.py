"""Local contraction of a fixed-point map: the spectral radius of J = df/dz at z*, by power
iteration on Jacobian-vector products, and the linear rate fixed-point iteration actually
showed. Near z*, fixed-point residuals shrink by about rho(J) per step, so the two should
agree; rho(J) >= 1 means plain iteration cannot converge there.

Everything is per sample: a per-sample cell has a block-diagonal batch Jacobian, so one
batched power iteration, normalised per sample, estimates every sample's radius at once.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

TINY = 1e-30


def _unit(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (v / ||v|| per sample, ||v|| per sample)."""
    norm = torch.linalg.vector_norm(v.flatten(1), dim=1)
    return v / norm.clamp_min(TINY).view(-1, *([1] * (v.dim() - 1))), norm


def spectral_radius(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
                    iters: int = 100, mode: Literal["vjp", "jvp"] = "vjp",
                    seed: int = 0) -> torch.Tensor:
    """Return a (B,) tensor: the estimated spectral radius of df/dz at z, per sample.

    Power iteration v <- A v / ||A v|| with A = J^T (mode "vjp": one backward per step)
    or A = J (mode "jvp": forward products via the double-vjp trick, two backwards per
    step). J and J^T have the same eigenvalues, so both estimate rho(J); vjp is cheaper.
    See `_radius` for how the growth factors become one number per sample.
    """
    if iters < 4:
        raise ValueError(f"iters must be >= 4, got {iters}")
    if mode not in ("vjp", "jvp"):
        raise ValueError(f"mode must be 'vjp' or 'jvp', got {mode!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
    v, _ = _unit(v)
    z_in = z.detach().clone().requires_grad_()
    with torch.enable_grad():
        out = f(z_in)
        if _ignores(out, z_in):
            # df/dz = 0 (an explicit baseline's cell returns its injection): radius 0,
            # and no graph from z for the products below to run through
            return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        if mode == "jvp":
            # J v = d/dw <J^T w, v>: J^T w is linear in w, so its graph gives J v exactly.
            w = torch.zeros_like(out, requires_grad=True)
            (jt_w,) = torch.autograd.grad(out, z_in, w, create_graph=True)

    def apply(x: torch.Tensor) -> torch.Tensor:
        if mode == "vjp":
            return torch.autograd.grad(out, z_in, x, retain_graph=True)[0].detach()
        return torch.autograd.grad(jt_w, w, x, retain_graph=True)[0].detach()

    growth = []
    for _ in range(iters - 1):
        v, norm = _unit(apply(v))
        growth.append(norm)
    # one more product from the last unit vector: x0 = v, x1 = A v, x2 = A^2 v
    x1 = apply(v)
    x2 = apply(x1)
    return _radius(torch.stack(growth), v, x1, x2)


def _ignores(out: torch.Tensor, z: torch.Tensor) -> bool:
    """True when `out` does not depend on `z` at all (no autograd path from z to it)."""
    if not out.requires_grad:
        return True
    return torch.autograd.grad(out, z, torch.zeros_like(out), retain_graph=True,
                               allow_unused=True)[0] is None


def _radius(growth: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor,
            settled: float = 1e-3, min_det: float = 1e-6, fit_tol: float = 1e-3
            ) -> torch.Tensor:
    """Turn power-iteration growth factors ((iters, B)) and the last Krylov vectors into
    one radius per sample.

    - Settled growth (a real dominant eigenvalue, the usual case): the last factor.
    - Oscillating growth means a complex dominant pair, where A^k v rotates: fit
      x2 = a x1 + b x0 (the 2-term recurrence the pair obeys) and take the larger root
      modulus of t^2 - a t - b. Used only when the fit is well conditioned and exact
      (relative residual < fit_tol), i.e. the other modes have died out.
    - Otherwise (several eigenvalues of nearly equal modulus still mixing): the growth
      rate over the last half, ||A^m v||^(1/m), which tends to rho for any spectrum,
      with an error of order log(condition of the eigenbasis) / m.
    """
    last = growth[-5:]
    spread = (last.max(0).values - last.min(0).values) / last.max(0).values.clamp_min(TINY)
    window = growth[growth.shape[0] // 2:].clamp_min(TINY).log().mean(0).exp()

    a0, a1, a2 = (t.flatten(1).double() for t in (x0, x1, x2))
    g11, g10, g00 = (a1 * a1).sum(1), (a1 * a0).sum(1), (a0 * a0).sum(1)
    r1, r0 = (a1 * a2).sum(1), (a0 * a2).sum(1)
    det = g11 * g00 - g10 * g10
    well = det > min_det * g11 * g00
    det_safe = torch.where(well, det, torch.ones_like(det))
    a = (r1 * g00 - r0 * g10) / det_safe
    b = (g11 * r0 - g10 * r1) / det_safe
    disc = a * a + 4 * b
    sq = disc.clamp_min(0).sqrt()
    real_root = torch.maximum((a + sq).abs(), (a - sq).abs()) / 2
    fit = torch.where(disc >= 0, real_root, (-b).clamp_min(0).sqrt())
    miss = torch.linalg.vector_norm(a2 - a[:, None] * a1 - b[:, None] * a0, dim=1)
    exact = miss <= fit_tol * torch.linalg.vector_norm(a2, dim=1)

    est = torch.where(well & exact & torch.isfinite(fit), fit.to(window.dtype), window)
    return torch.where(spread < settled, growth[-1], est)


def linear_rate(trace: torch.Tensor, tail: float = 0.5, min_steps: int = 2) -> torch.Tensor:
    """Return a (B,) tensor: the observed linear convergence rate per sample.

    `trace` is a solver's (n_evals, B) residual trace, NaN once a sample stopped. The rate
    is the geometric mean of successive residual ratios over the last `tail` fraction of
    each sample's own trace, i.e. (r_last / r_start)^(1 / steps): the early, transient
    iterations from z0 say nothing about the local rate. NaN where a sample has fewer than
    `min_steps` ratios in its tail (it converged almost at once) or a zero residual.
    """
    rates = torch.full((trace.shape[1],), float("nan"), dtype=torch.float64)
    cols = trace.detach().double().cpu().T
    for b, col in enumerate(cols):
        ok = torch.isfinite(col) & (col > 0)
        # the trace is contiguous until the sample stops; a later NaN ends it
        n = int(ok.long().cumprod(0).sum())
        start = int(n * (1.0 - tail))
        steps = n - 1 - start
        if steps >= min_steps:
            rates[b] = (col[n - 1] / col[start]) ** (1.0 / steps)
    return rates
