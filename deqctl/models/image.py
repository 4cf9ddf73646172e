"""`resnet_deq`: an image classifier whose body is one DEQ ResNet cell.

Input: float images in [0, 1], shaped (N, C, H, W); normalisation happens inside, so
exported artefacts take the same input as `deqctl.load`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataInfo
from ..implicit import DEQ
from ..recipe import ResNetDEQSettings
from .base import DEQModel
from .dropout import dropout, variational_mask
from .norms import normalised


class ResNetCell(nn.Module):
    """f(z, u) = GN(relu(z + GN(u + conv2(GN(relu(conv1(z))))))).

    GroupNorm normalises within each sample, so the cell is per-sample and the solvers'
    `compact` option may skip converged samples.
    """

    def __init__(self, channels: int, inner: int, groups: int, norm: str, dropout: float,
                 init_std: float | None = None):
        super().__init__()
        self.conv1 = normalised(nn.Conv2d(channels, inner, 3, padding=1, bias=False), norm, init_std)
        self.conv2 = normalised(nn.Conv2d(inner, channels, 3, padding=1, bias=False), norm, init_std)
        self.norm1 = nn.GroupNorm(_groups(groups, inner), inner, affine=False)
        self.norm2 = nn.GroupNorm(_groups(groups, channels), channels, affine=False)
        self.norm3 = nn.GroupNorm(_groups(groups, channels), channels, affine=False)
        self.inner, self.dropout = inner, dropout
        self.mask: torch.Tensor | None = None

    def draw_mask(self, u: torch.Tensor, training: bool) -> None:
        """Variational dropout: one channel mask per forward pass, shared by every f call
        of the solve and its backward, so the solver iterates one fixed map (a fresh mask
        per call, as nn.Dropout2d would draw, moves the fixed point under the solver)."""
        self.mask = variational_mask((u.shape[0], self.inner, 1, 1), self.dropout, u) \
            if training and self.dropout else None

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        y = dropout(self.norm1(F.relu(self.conv1(z))), self.mask)
        return self.norm3(F.relu(z + self.norm2(u + self.conv2(y))))


def _groups(groups: int, channels: int) -> int:
    """The largest group count <= `groups` that divides `channels`."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


class ResNetDEQ(DEQModel):
    """Stem (optionally downsampling) -> DEQ ResNet cell -> pooled linear head."""

    inputs, tasks = ("image",), ("classify",)

    def __init__(self, cfg: ResNetDEQSettings, info: DataInfo, deq: DEQ, warm_start: bool = False):
        super().__init__(info, deq, warm_start)
        c, ch = info.channels, cfg.channels
        self.register_buffer("mean", torch.tensor(info.mean).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(info.std).view(1, c, 1, 1))
        self.stem = nn.Sequential(
            nn.Conv2d(c, ch, 3, stride=cfg.stem_stride, padding=1, bias=False),
            nn.GroupNorm(_groups(cfg.groups, ch), ch))
        self.body = ResNetCell(ch, cfg.inner_channels, cfg.groups, cfg.norm, cfg.dropout,
                               cfg.init_std)
        self.head = nn.Sequential(
            nn.GroupNorm(_groups(cfg.groups, ch), ch), nn.AdaptiveAvgPool2d(cfg.head_pool),
            nn.Flatten(),
            nn.Linear(ch * cfg.head_pool ** 2, info.num_classes))

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        u = self.stem((x - self.mean) / self.std)
        self.body.draw_mask(u, self.training)     # once per forward pass, like u itself
        return u

    def cell(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.body(z, u)

    def init_state(self, u: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(u)

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(z)
