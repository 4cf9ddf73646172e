"""`resnet_deq`: an image classifier, or a tagger of every pixel, whose body is one DEQ
ResNet cell.

Input: float images in [0, 1], shaped (N, C, H, W); normalisation happens inside, so
exported artefacts take the same input as `deqctl.load`. A tagger (task `tag`, e.g.
mazes) keeps the resolution throughout and reads out each pixel with a 1x1 convolution,
so it is fully convolutional: trained on small images, it reads larger ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataInfo
from ..implicit import DEQ
from ..options import Count, Positive, Rate
from .base import DEQModel
from .dropout import dropout, variational_mask
from .norms import Norm, normalised
from .registry import MODELS


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


@MODELS.register("resnet_deq")
class ResNetDEQ(DEQModel):
    """Stem (optionally downsampling) -> DEQ ResNet cell -> pooled linear head (classify),
    or a 1x1 convolution at every pixel (tag).

    `channels` of the state, `inner_channels` inside the cell, `groups` of GroupNorm,
    `stem_stride` downsampling of the stem (unset: 2 to classify, 1 to tag; a tagger
    refuses more), `norm` of the cell's convolutions, `head_pool` (classify: the head
    pools to head_pool x head_pool cells), `init_std` (N(0, std) init of the cell's
    convolutions), `dropout` (variational, one mask per forward pass).
    """

    inputs, tasks = ("image",), ("classify", "tag")

    def __init__(self, info: DataInfo, deq: DEQ, *, channels: Count = 32,
                 inner_channels: Count = 64, groups: Count = 4, stem_stride: Count | None = None,
                 norm: Norm = "weight", head_pool: Count = 4, init_std: Positive | None = None,
                 dropout: Rate = 0.0):
        super().__init__(info, deq)
        c, ch = info.channels, channels
        self.tags = info.task == "tag"
        self.per_sample = not dropout
        self.register_buffer("mean", torch.tensor(info.mean).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(info.std).view(1, c, 1, 1))
        self.stem = nn.Sequential(
            nn.Conv2d(c, ch, 3, stride=_stem_stride(stem_stride, self.tags), padding=1,
                      bias=False),
            nn.GroupNorm(_groups(groups, ch), ch))
        self.body = ResNetCell(ch, inner_channels, groups, norm, dropout, init_std)
        if self.tags:
            self.head = nn.Sequential(nn.GroupNorm(_groups(groups, ch), ch),
                                      nn.Conv2d(ch, info.num_classes, 1))
        else:
            self.head = nn.Sequential(
                nn.GroupNorm(_groups(groups, ch), ch), nn.AdaptiveAvgPool2d(head_pool),
                nn.Flatten(),
                nn.Linear(ch * head_pool ** 2, info.num_classes))

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        u = self.stem((x - self.mean) / self.std)
        self.body.draw_mask(u, self.training)     # once per forward pass, like u itself
        return u

    def cell(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.body(z, u)

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.head(z)
        return out.movedim(1, -1) if self.tags else out     # tag: (N, H, W, classes)


def _stem_stride(stride: int | None, tags: bool) -> int:
    """The stem's stride: as set, else 2 to classify (a cheaper state) and 1 to tag."""
    if stride is None:
        return 1 if tags else 2
    if tags and stride != 1:
        raise ValueError(f"model.stem_stride={stride}: a tagger predicts at every pixel of its "
                         f"input; leave model.stem_stride unset or 1")
    return stride
