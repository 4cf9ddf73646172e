"""Gradient checker: how close each DEQ gradient rule is to the true gradient.

    report = compare_to_unrolled(cell, u, z0, params,
                                 {"forward": {"tol": 1e-8, "max_iter": 200}})
    report["ift"].cosine   # >= 0.999 when the forward and adjoint solves converge

`settings` are the DEQ layer's keyword arguments (`deqctl.DEQ(**settings)`); each rule
replaces only `backward.mode`.

The reference is the gradient of an unrolled solve (plain fixed-point steps with autograd
through every step) run until its residual stops falling; for a contraction that converges
to the implicit gradient. `ift_vs_finite_differences` checks IFT against central
differences, which is only meaningful in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..solvers import packing_of
from .layer import DEQ

Loss = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GradReport:
    cosine: float          # cosine similarity with the reference, all parameters flattened
    rel_error: float       # ||g - g_ref|| / ||g_ref||


def _flat(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params)])


def _report(g: torch.Tensor, ref: torch.Tensor) -> GradReport:
    cos = torch.nn.functional.cosine_similarity(g, ref, dim=0).item()
    return GradReport(cos, ((g - ref).norm() / ref.norm().clamp_min(1e-30)).item())


def _default_loss(z: torch.Tensor) -> torch.Tensor:
    # a fixed random linear functional plus a quadratic: gradients in every direction
    g = torch.Generator(device="cpu").manual_seed(1234)
    w = torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)
    return (w * z).sum() + 0.5 * (z ** 2).sum()


def unrolled_gradient(cell, u, z0, params, loss: Loss = _default_loss, max_steps: int = 500,
                      tol: float = 1e-10) -> torch.Tensor:
    """Flattened gradient of loss(z_K) through K plain fixed-point steps, K chosen by
    running until the relative residual is below tol (or max_steps)."""
    z = z0
    for _ in range(max_steps):
        z_next = cell(z, u)
        done = (z_next - z).norm() <= tol * z_next.norm()
        z = z_next
        if done:
            break
    return _flat(torch.autograd.grad(loss(z), params, allow_unused=True), params)


def deq_gradient(cell, u, z0, params, settings: Mapping[str, Any], loss: Loss = _default_loss
                 ) -> torch.Tensor:
    """Flattened gradient of loss(DEQ output) under the layer built from `settings`."""
    z, _ = DEQ(**settings).train()(cell, u, z0)
    return _flat(torch.autograd.grad(loss(z), params, allow_unused=True), params)


def _packed(cell, z0, loss):
    """A state of several tensors as the one packed tensor the reference iterates."""
    packing = packing_of(z0)
    if packing is None:
        return cell, z0, loss
    return packing.wrap(cell), packing.pack(z0), (lambda z: loss(packing.unpack(z)))


def compare_to_unrolled(cell, u, z0, params, settings: Mapping[str, Any],
                        modes: Sequence[str] = ("ift", "phantom", "jfb"),
                        loss: Loss = _default_loss) -> dict[str, GradReport]:
    """Return {mode: GradReport} of each gradient rule against the unrolled reference
    (z0 may be a tuple of tensors; `loss` then takes the tuple)."""
    cell, z0, loss = _packed(cell, z0, loss)
    ref = unrolled_gradient(cell, u, z0, params, loss)
    out = {}
    for mode in modes:
        out[mode] = _report(deq_gradient(cell, u, z0, params, with_mode(settings, mode), loss),
                            ref)
    return out


def with_mode(settings: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """`settings` with backward.mode set to `mode`."""
    return {**settings, "backward": {**settings.get("backward", {}), "mode": mode}}


@torch.no_grad()
def _loss_at(cell, u, z0, settings, loss):
    z, _ = DEQ(**settings).eval()(cell, u, z0)
    return loss(z)


def ift_vs_finite_differences(cell, u, z0, params, settings: Mapping[str, Any],
                              loss: Loss = _default_loss, eps: float = 1e-6) -> GradReport:
    """IFT gradient against central differences over every parameter entry (float64;
    keep the problem small: two solves per entry)."""
    cell, z0, loss = _packed(cell, z0, loss)
    s = with_mode(settings, "ift")
    g = deq_gradient(cell, u, z0, params, s, loss)
    fd = []
    for p in params:
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            orig = flat[i].item()
            flat[i] = orig + eps
            up = _loss_at(cell, u, z0, s, loss)
            flat[i] = orig - eps
            down = _loss_at(cell, u, z0, s, loss)
            flat[i] = orig
            fd.append(((up - down) / (2 * eps)).item())
    return _report(g, torch.tensor(fd, dtype=g.dtype, device=g.device))
