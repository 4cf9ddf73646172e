"""`mdeq`: a multiscale DEQ image classifier (Bai, Koltun, Kolter, NeurIPS 2020). The state
is one tensor per resolution branch, solved jointly as a single fixed point:

    branch i (channels[i] at 1/2^i of the stem's resolution):
        y_i = GN(relu(z_i + GN(conv(relu(GN(conv(z_i)))) + u_i)))
        u_i = u (finest branch), else conv1x1(avgpool_{2^i}(u))
    multi-resolution fusion, for every branch j:
        z_j' = GN(y_j + sum_{i != j} T_ij(y_i))   finer i: strided 3x3 convs down to j;
                                                  coarser i: 1x1 conv, then upsample

The input is injected into every branch, inside its second norm. The MDEQ paper injects
into the finest branch only; a branch without injection normalises a signal the weights
may keep small (GroupNorm's gain is then large) and its map stops contracting: measured
spectral radius of df/dz 1.1-1.3 at initialisation without, below 1 with. Every
normalisation is GroupNorm (per sample), so the solvers' `compact` option applies.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Len
from torch import nn

from ..data import DataInfo
from ..implicit import DEQ
from ..options import Count, Positive, Rate
from .base import DEQModel
from .dropout import dropout, variational_mask
from .image import _groups
from .norms import Norm, normalised
from .registry import MODELS


class Branch(nn.Module):
    """The residual block of one resolution."""

    def __init__(self, c: int, expansion: int, groups: int, norm: str, init_std: float | None):
        super().__init__()
        inner = c * expansion
        self.conv1 = normalised(nn.Conv2d(c, inner, 3, padding=1, bias=False), norm, init_std)
        self.conv2 = normalised(nn.Conv2d(inner, c, 3, padding=1, bias=False), norm, init_std)
        self.gn1 = nn.GroupNorm(_groups(groups, inner), inner, affine=False)
        self.gn2 = nn.GroupNorm(_groups(groups, c), c, affine=False)
        self.gn3 = nn.GroupNorm(_groups(groups, c), c, affine=False)
        self.inner = inner

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        y = self.conv2(dropout(F.relu(self.gn1(self.conv1(z))), mask))
        return self.gn3(F.relu(z + self.gn2(y + u)))


def _down(c_in: int, c_out: int, steps: int, norm: str, init_std: float | None) -> nn.Module:
    """`steps` strided 3x3 convs from a finer to a coarser branch."""
    layers: list[nn.Module] = []
    for k in range(steps):
        out = c_out if k == steps - 1 else c_in
        layers.append(normalised(nn.Conv2d(c_in, out, 3, stride=2, padding=1, bias=False),
                                 norm, init_std))
        if k < steps - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Fusion(nn.Module):
    """Every branch receives the sum of all branches, resampled to its resolution.

    The paths carry no normalisation of their own: GroupNorm rescales whatever it gets to
    unit spread, so a norm on a path would make its gain 1/spread of a signal the weights
    may have made small, and the map stops contracting (measured: spectral radius of
    df/dz 1.2-1.5 at initialisation with a normalised path and post-fusion conv, as in
    the MDEQ reference). Here the weights set each path's scale, and one GroupNorm per
    branch normalises the sum.
    """

    def __init__(self, channels: list[int], groups: int, norm: str, init_std: float | None):
        super().__init__()
        n = len(channels)
        self.paths = nn.ModuleDict()
        for i in range(n):
            for j in range(n):
                if i < j:
                    self.paths[f"{i}{j}"] = _down(channels[i], channels[j], j - i, norm, init_std)
                elif i > j:
                    self.paths[f"{i}{j}"] = normalised(
                        nn.Conv2d(channels[i], channels[j], 1, bias=False), norm, init_std)
        self.post = nn.ModuleList(nn.GroupNorm(_groups(groups, c), c, affine=False)
                                  for c in channels)

    def forward(self, ys: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        fused = []
        for j, y_j in enumerate(ys):
            total = y_j
            for i, y_i in enumerate(ys):
                if i < j:
                    total = total + self.paths[f"{i}{j}"](y_i)
                elif i > j:
                    total = total + F.interpolate(self.paths[f"{i}{j}"](y_i), size=y_j.shape[-2:],
                                                  mode="nearest")
            fused.append(self.post[j](total))
        return tuple(fused)


@MODELS.register("mdeq")
class MDEQ(DEQModel):
    """Stem -> multiscale DEQ (branches solved jointly) -> pooled branches -> linear head.

    `channels` per branch, finest first (2 to 4 branches; branch i runs at 1/2^i of the
    stem's resolution), `expansion` of each branch block's inner channels, `groups` of
    GroupNorm, `stem_stride`, `norm`, `init_std`, `dropout`, `head_width`.
    """

    inputs, tasks = ("image",), ("classify",)

    def __init__(self, info: DataInfo, deq: DEQ, *,
                 channels: Annotated[list[Count], Len(2, 4)] = (24, 48), expansion: Count = 2,
                 groups: Count = 4, stem_stride: Count = 1, norm: Norm = "weight",
                 init_std: Positive | None = None, dropout: Rate = 0.0, head_width: Count = 128):
        super().__init__(info, deq)
        self.per_sample = not dropout
        c0, chans = info.channels, list(channels)
        self.register_buffer("mean", torch.tensor(info.mean).view(1, c0, 1, 1))
        self.register_buffer("std", torch.tensor(info.std).view(1, c0, 1, 1))
        self.stem = nn.Sequential(
            nn.Conv2d(c0, chans[0], 3, stride=stem_stride, padding=1, bias=False),
            nn.GroupNorm(_groups(groups, chans[0]), chans[0]))
        self.branches = nn.ModuleList(Branch(c, expansion, groups, norm, init_std)
                                      for c in chans)
        self.fusion = Fusion(chans, groups, norm, init_std)
        self.injections = nn.ModuleList(nn.Conv2d(chans[0], c, 1, bias=False) for c in chans[1:])
        self.head = nn.Sequential(nn.Linear(sum(chans), head_width), nn.ReLU(),
                                  nn.Linear(head_width, info.num_classes))
        self.p = dropout
        self.masks: list[torch.Tensor | None] = [None] * len(chans)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        u = self.stem((x - self.mean) / self.std)
        self.masks = [variational_mask((u.shape[0], b.inner, 1, 1), self.p, u)
                      if self.training and self.p else None for b in self.branches]
        return u

    def init_state(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, _, h, w = u.shape
        return tuple(u.new_zeros(n, b.gn3.num_channels, -(-h // 2**i), -(-w // 2**i))
                     for i, b in enumerate(self.branches))

    def cell(self, z: tuple[torch.Tensor, ...], u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # u stays one tensor (the solvers index it by sample); coarser copies are cheap
        us = [u] + [proj(F.avg_pool2d(u, 2**i, ceil_mode=True))
                    for i, proj in enumerate(self.injections, start=1)]
        return self.fusion([b(z_i, m, u_i) for b, z_i, m, u_i
                            in zip(self.branches, z, self.masks, us)])

    def decode(self, z: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([z_i.mean(dim=(2, 3)) for z_i in z], dim=1))
