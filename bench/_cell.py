"""The benchmark's DEQ-ResNet cell, inputs and solve settings, shared by every configuration
of `bench/solvers.py` so that both libraries see exactly the same f, u, z0 and tolerances.

f(z, u) = GN(relu(z + GN(u + conv2(GN(relu(conv1(z)))))))
conv1: 3x3, C -> inner; conv2: 3x3, inner -> C; no biases; weights ~ N(0, 0.02);
GroupNorm without affine parameters (per-sample, so deqctl's `compact` knob is allowed).
Defined here rather than imported from deqctl.models so the benchmark measures the solvers
against a fixed cell while the model code changes.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# The state is (batch, CHANNELS, SIZE, SIZE); a GPU run fills the card with a larger one
# (bench/gpu.sh: DEQ_BENCH_CHANNELS=64 DEQ_BENCH_SIZE=32, read by the memory children too).
CHANNELS = int(os.environ.get("DEQ_BENCH_CHANNELS", 48))
SIZE = int(os.environ.get("DEQ_BENCH_SIZE", 28))
INNER, GROUPS, INIT_STD = 64, 8, 0.02
# rel tol (fixed point: TOL_FP), budget and Anderson knobs of every solve, both libraries
MAX_ITER, TOL, TOL_FP, M, LAM = 80, 1e-4, 2e-4, 5, 1e-4
BWD_TOL, BWD_MAX_ITER = TOL_FP, MAX_ITER   # default IFT backward: fixed point


class ResNetCell(nn.Module):
    """One weight-tied DEQ-ResNet cell; `forward(z, u)` returns a tensor shaped like z."""

    def __init__(self, channels: int = CHANNELS, inner: int = INNER, groups: int = GROUPS,
                 init_std: float = INIT_STD):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0.0, init_std)
        self.norm1 = nn.GroupNorm(groups, inner, affine=False)
        self.norm2 = nn.GroupNorm(groups, channels, affine=False)
        self.norm3 = nn.GroupNorm(groups, channels, affine=False)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        y = self.norm1(F.relu(self.conv1(z)))
        return self.norm3(F.relu(z + self.norm2(u + self.conv2(y))))


def make_problem(batch: int, device: str, seed: int = 0):
    """Return (cell, u, z0, target): a seeded cell, an input injection, a zero initial
    state and a fixed random tensor for the train-step loss mean(z * target).

    (A loss such as mean(z**2) would be useless here: the cell ends in GroupNorm, so
    sum(z**2) per group is constant and its gradient vanishes at the fixed point.)"""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cell = ResNetCell().to(device)
    u = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=g).to(device)
    target = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=g).to(device)
    z0 = torch.zeros(batch, CHANNELS, SIZE, SIZE, device=device)
    return cell, u, z0, target
