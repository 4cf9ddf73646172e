"""`mondeq`: a monotone operator equilibrium network (Winston & Kolter, NeurIPS 2020).

    z* = relu(W z* + U x + b),   W = (1 - m) I - AᵀA + B - Bᵀ

I - W is m-strongly monotone for any A and B, so the fixed point exists and is unique for
every input and every weight, and operator splitting finds it from any start. The cell is
one step of a splitting, which the generic solvers iterate (or accelerate: Anderson):

- `forward_backward`: z <- relu((1 - alpha) z + alpha (W z + u)); converges for
  alpha <= 2m / L², L = ||I - W||₂. The state is z.
- `peaceman_rachford`: with R = (I + alpha (I - W))⁻¹, the state v and z = relu(v),
  v <- 2 R(2z - v + alpha u) - (2z - v); converges for every alpha > 0.

Both have the same fixed points z* (for PR, relu(v*)), and decode reads relu(state), so
the two give one model; the implicit gradient is that of z* whichever map was solved.

`layout: conv` is the paper's single-convolution model: A, B and U are `kernel` x `kernel`
circular convolutions, which the 2-D Fourier transform turns into one `channels` x
`channels` matrix per frequency: Wz, its adjoint and R are then exact and cheap. `layout:
fc` is the fully connected model, the same code on a 1 x 1 "image" of `channels` units.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataInfo
from ..implicit import DEQ
from ..options import Count, Fraction, Positive
from .base import DEQModel
from .registry import MODELS

Splitting = Literal["forward_backward", "peaceman_rachford"]


class MonotoneOperator(nn.Module):
    """W = (1 - m) I - AᵀA + B - Bᵀ for circular convolutions A, B on `size` images,
    as one C x C complex matrix per frequency of the 2-D real FFT."""

    def __init__(self, channels: int, kernel: int, size: tuple[int, int], m: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(channels, channels, kernel, kernel))
        self.B = nn.Parameter(torch.empty(channels, channels, kernel, kernel))
        for p in (self.A, self.B):         # nn.Conv2d's initialisation
            nn.init.kaiming_uniform_(p, a=5 ** 0.5)
        self.size, self.m = size, m

    def _spectrum(self, kernel: torch.Tensor) -> torch.Tensor:
        """The (H * (W//2+1), C_out, C_in) transfer matrices of a kernel centred at (0, 0)."""
        k, c = kernel.shape[-1], kernel.shape[0]
        full = F.pad(kernel, (0, self.size[1] - k, 0, self.size[0] - k))
        full = torch.roll(full, (-(k // 2), -(k // 2)), dims=(-2, -1))
        return torch.fft.rfft2(full).reshape(c, c, -1).permute(2, 0, 1)

    def matrix(self) -> torch.Tensor:
        """W per frequency."""
        a, b = self._spectrum(self.A), self._spectrum(self.B)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        return (1 - self.m) * eye - a.mH @ a + b - b.mH


def _per_frequency(mat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Apply a (H * (W//2+1), C, C) matrix field to images z (N, C, H, W)."""
    n, c, h, w = z.shape
    zf = torch.fft.rfft2(z)
    # frequencies leading and contiguous: one batched product, no per-frequency copies
    out = mat @ zf.reshape(n, c, -1).permute(2, 1, 0).contiguous()      # (F, C, N)
    return torch.fft.irfft2(out.permute(2, 1, 0).reshape(zf.shape), s=(h, w))


def _resolvent(w: torch.Tensor, alpha: float) -> torch.Tensor:
    """(I + alpha (I - W))⁻¹ per frequency, W given per frequency by `w`."""
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    return torch.linalg.inv((1 + alpha) * eye - alpha * w)


@MODELS.register("mondeq")
class MonDEQ(DEQModel):
    """Monotone DEQ image classifier: injection U x + b, the monotone cell, then relu(z*)
    average-pooled to `pool` x `pool` cells and a linear head (conv), or a linear head
    (fc). `m` is the monotonicity margin, `alpha` the splitting's step."""

    inputs, tasks = ("image",), ("classify",)

    def __init__(self, info: DataInfo, deq: DEQ, *, layout: Literal["conv", "fc"] = "conv",
                 channels: Count = 54, kernel: Count = 3, m: Fraction = 1.0,
                 splitting: Splitting = "peaceman_rachford", alpha: Positive = 1.0,
                 pool: Count = 4):
        super().__init__(info, deq)
        c, h, w = info.shape
        if layout == "conv" and (kernel % 2 == 0 or kernel > min(h, w)):
            raise ValueError(f"model.kernel: {kernel} must be odd and at most {min(h, w)}")
        self.layout, self.splitting, self.alpha = layout, splitting, alpha
        self.register_buffer("mean", torch.tensor(info.mean).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(info.std).view(1, c, 1, 1))
        if layout == "conv":
            self.U = nn.Conv2d(c, channels, kernel, padding=kernel // 2, padding_mode="circular")
            self.W = MonotoneOperator(channels, kernel, (h, w), m)
            self.head = nn.Sequential(nn.AvgPool2d(pool), nn.Flatten(),
                                      nn.Linear(channels * (h // pool) * (w // pool),
                                                info.num_classes))
        else:
            self.U = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, channels),
                                   nn.Unflatten(1, (channels, 1, 1)))
            self.W = MonotoneOperator(channels, 1, (1, 1), m)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels, info.num_classes))
        self.linear: torch.Tensor | None = None      # set by inject, read by cell

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        # The splitting's linear map, once per forward pass like u itself (W for
        # forward-backward, the resolvent for Peaceman-Rachford): every cell call of the
        # solve and its backward then costs two FFTs and one matrix product per frequency.
        w = self.W.matrix()
        self.linear = w if self.splitting == "forward_backward" else _resolvent(w, self.alpha)
        return self.U((x - self.mean) / self.std)

    def cell(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        if self.splitting == "forward_backward":
            return F.relu((1 - a) * z + a * (_per_frequency(self.linear, z) + u))
        reflected = 2 * F.relu(z) - z
        return 2 * _per_frequency(self.linear, reflected + a * u) - reflected

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(z))
