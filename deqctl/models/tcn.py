"""`tcn_deq`: a TrellisNet-style DEQ (Bai, Kolter, Koltun, 2019, after TrellisNet, 2019).
The cell is one weight-tied causal temporal convolution with LSTM gating, its input
injected at every application:

    z = [h; c]                      (N, 2 * channels, L)
    g = conv_k(h) + u               causal over time; u = conv_k(embedded input), once
    c' = sigmoid(f) * c[t-1] + sigmoid(i) * tanh(g_c);  h' = sigmoid(o) * tanh(c')

Each position mixes its own and the previous k-1 positions, and the cell state arrives
from the previous position, so information travels one step further back per
application: the fixed point sees the whole past. Cheaper per f call than attention
(measured on 2 CPU cores, B=32, L=128: 0.8x the transformer cell's time at width 128,
0.53x at width 256).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import nn

from ..data import DataInfo
from ..implicit import DEQ
from ..options import Count, Positive, Rate
from .adaptive import Adaptive
from .base import DEQModel
from .dropout import dropout, variational_mask
from .norms import Norm, normalised
from .registry import MODELS
from .sequence import (InputReader, SequenceHead, TaskHead, WindowNorm, check_inputs,
                       takes_any_length)


def causal_conv(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """conv over time (N, C, L) seeing only the present and the past (left padding)."""
    return conv(F.pad(x, (conv.kernel_size[0] - 1, 0)))


class TrellisCell(nn.Module):
    """f(z, u) with LSTM gating over a causal convolution of the hidden half of z."""

    def __init__(self, d: int, kernel_size: int, norm: str, init_std: float | None,
                 dropout: float):
        super().__init__()
        self.d, self.p = d, dropout
        self.conv = normalised(nn.Conv1d(d, 4 * d, kernel_size, bias=False), norm, init_std)
        self.mask: torch.Tensor | None = None

    def draw_mask(self, u: torch.Tensor, training: bool) -> None:
        """Variational dropout on the hidden channels: one mask per sample and channel,
        shared by all positions and all f calls of the solve."""
        self.mask = variational_mask((u.shape[0], self.d, 1), self.p, u) \
            if training and self.p else None

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        h, c = z[:, :self.d], z[:, self.d:]
        gates = causal_conv(dropout(h, self.mask), self.conv) + u
        i, f, o, g = gates.chunk(4, dim=1)
        c_prev = F.pad(c, (1, 0))[:, :, :-1]                  # c at t - 1 (zero at t = 0)
        c_new = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        return torch.cat([torch.sigmoid(o) * torch.tanh(c_new), c_new], dim=1)


@MODELS.register("tcn_deq")
class TcnDEQ(DEQModel):
    """Input embedding -> causal input injection -> DEQ TrellisNet cell -> task head.

    `channels` (hidden; the state holds h and c), `kernel_size` (causal, over time),
    `norm`, `init_std`, `dropout` (variational), `head` (SequenceHead), `adaptive` (lm:
    adaptive input embedding and softmax; models/adaptive.py).
    """

    inputs, tasks = ("tokens", "sequence"), ("classify", "lm", "forecast", "tag")
    time_axis = 2                                       # causal over L of (N, 2d, L)

    def __init__(self, info: DataInfo, deq: DEQ, *, channels: Annotated[int, Ge(4)] = 128,
                 kernel_size: Count = 2, norm: Norm = "weight", init_std: Positive | None = None,
                 dropout: Rate = 0.0, head: SequenceHead = SequenceHead(),
                 adaptive: Adaptive | None = None):
        check_inputs(info, "tcn_deq")
        super().__init__(info, deq)
        self.per_sample = not dropout
        d = channels
        self.dynamic_length = takes_any_length(info, head)
        window = WindowNorm(head.window_norm, info)
        self.reader = InputReader(info, d, window, adaptive=adaptive)
        self.inject_conv = nn.Conv1d(d, 4 * d, kernel_size)
        self.body = TrellisCell(d, kernel_size, norm, init_std, dropout)
        self.head = TaskHead(head, info, d, True, window, adaptive=adaptive,
                             embedding=self.reader.embed)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        u = causal_conv(self.reader(x).transpose(1, 2), self.inject_conv)     # (N, 4d, L)
        self.body.draw_mask(u, self.training)
        return u

    def cell(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.body(z, u)

    def init_state(self, u: torch.Tensor) -> torch.Tensor:
        n, _, length = u.shape
        return u.new_zeros(n, 2 * self.body.d, length)

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(z[:, :self.body.d].transpose(1, 2), x)
