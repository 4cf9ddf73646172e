"""Path independence (Anil et al., NeurIPS 2022): does the fixed point depend on where the
solve starts? The batch is solved from the model's usual start and from K random starts of
the state's scale; what is measured is how far apart the solutions land, how often the
predictions agree, and how many samples reach one fixed point from every start.

Two converged solutions z_a, z_b of a map contracting at rate rho lie within
(r_a + r_b) / (1 - rho) of each other (r: their residuals ||f(z) - z||), so a sample
"agrees" when every start's solution is that close to the usual one; rho is the spectral
radius of df/dz at the usual solution, capped at 0.99 (a non-contracting sample would
otherwise allow any distance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils import parametrize

from ..implicit import SolveSpec, cell_map
from ..models import DEQModel
from ..tasks import Task
from .spectral import spectral_radius
from .trace import model_map

RHO_CAP = 0.99


@dataclass
class StartsReport:
    """Per-sample results over K random starts (tensors of length batch)."""

    starts: int
    distance: torch.Tensor      # max over starts of ||z_k - z_0|| / max(||z_k||, ||z_0||)
    agreement: torch.Tensor     # fraction of starts whose prediction equals z_0's
    unique: torch.Tensor        # every solve converged and within the contraction bound
    converged: torch.Tensor     # every solve converged

    def summary(self) -> dict[str, Any]:
        d = self.distance.double()
        return {"starts": self.starts, "distance_median": float(d.median()),
                "distance_max": float(d.max()),
                "prediction_agreement": float(self.agreement.double().mean()),
                "unique": float(self.unique.double().mean()),
                "converged": float(self.converged.double().mean())}

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "distance": self.distance.tolist()}


def path_independence(model: DEQModel, task: Task, x: torch.Tensor, spec: SolveSpec,
                      starts: int, seed: int = 0, power_iters: int = 50) -> StartsReport:
    """Solve the batch x from the model's start and from `starts` random ones (normal,
    scaled per sample to the usual solution's RMS, or 1 where that is 0; seeded by
    `seed`). Distances are relative to the larger of the two solutions' norms (at most 2)."""
    model.eval()
    with torch.no_grad(), parametrize.cached():
        u, z0, cell, decode = model_map(model, x)
        f = cell_map(cell, u)
        ref = spec.run(f, z0)
        out_ref = decode(ref.z)
        flat = ref.z.flatten(1)
        norm = flat.norm(dim=1)
        rms = norm / flat.shape[1] ** 0.5
        scale = torch.where(rms > 0, rms, torch.ones_like(rms))
        rho = spectral_radius(lambda z: cell(z, u), ref.z, iters=power_iters).clamp(max=RHO_CAP)
        g = torch.Generator(device="cpu").manual_seed(seed)
        distance = torch.zeros_like(norm)
        agree = torch.zeros_like(norm)
        unique = ref.converged.clone()
        converged = ref.converged.clone()
        for _ in range(starts):
            noise = torch.randn(ref.z.shape, generator=g, dtype=ref.z.dtype).to(ref.z.device)
            res = spec.run(f, noise * scale.view(-1, *[1] * (ref.z.dim() - 1)))
            gap = (res.z - ref.z).flatten(1).norm(dim=1)
            larger = torch.maximum(norm, res.z.flatten(1).norm(dim=1)).clamp_min(1e-30)
            distance = torch.maximum(distance, gap / larger)
            agree += _agree(task, decode(res.z), out_ref).float()
            allowed = (res.abs_residual + ref.abs_residual) / (1 - rho)
            converged &= res.converged
            unique &= res.converged & (gap <= allowed)
    return StartsReport(starts, distance.cpu(), (agree / starts).cpu(), unique.cpu(),
                        converged.cpu())


def _agree(task: Task, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample, whether every prediction of a sample agrees (a sequence: all positions)."""
    same = task.agree(a, b)
    return same.reshape(same.shape[0], -1).all(dim=1) if same.dim() > 1 else same
