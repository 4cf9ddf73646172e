"""Classic explicit networks of each task's kind, for `deq.mode: baseline`: what a DEQ
recipe is set against on the user's own data, trained by the same loop, evaluated,
compared and swept like any run.

    sequences (classify, lm,  a GRU (deq.baseline.width hidden, .layers layers), the last
               tag):          state for a class, every position's for next tokens or tags
    series (forecast):        a linear map from the window to the horizon, read relative
                              to the window's last value (NLinear, Zeng et al. 2023)
    images (classify):        a small CNN: .layers blocks of two 3x3 convolutions
                              (GroupNorm, ReLU) and 2x2 max pooling, then global pooling

Each is a DEQModel whose whole network is the input injection: its cell returns the
injection unchanged and its solve starts there, so the DEQ layer (in baseline mode: the
cell applied once, back-propagated) reports one evaluation at residual 0, and every tool
that reads a DEQModel reads a baseline too. They are chosen by the data, not by name:
`model.*` is the DEQ's and is left as it is, so one recipe swept over
deq.mode=implicit,baseline sets the two side by side.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import DataInfo
from ..implicit import DEQ
from .base import DEQModel, ModelError
from .sequence import InputReader, SequenceHead, TaskHead, WindowNorm


class Baseline(DEQModel):
    """An explicit network in DEQModel form: inject = the network, cell = identity in u."""

    def init_state(self, u: torch.Tensor) -> torch.Tensor:
        return u

    def cell(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u


class GRUBaseline(Baseline):
    inputs, tasks = ("tokens", "sequence"), ("classify", "lm", "tag")
    dynamic_length = True

    def __init__(self, info: DataInfo, deq: DEQ, *, width: int = 64, layers: int = 1):
        super().__init__(info, deq)
        window = WindowNorm("none", info)
        self.read = InputReader(info, width, window)
        self.gru = nn.GRU(width, width, num_layers=layers, batch_first=True)
        self.head = TaskHead(SequenceHead(pool="last"), info, width, causal=True, window=window)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(self.read(x))[0]

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(z, x)


class LinearForecaster(Baseline):
    inputs, tasks = ("sequence",), ("forecast",)

    def __init__(self, info: DataInfo, deq: DEQ, *, width: int = 64, layers: int = 1):
        super().__init__(info, deq)
        window = WindowNorm("last", info)
        # a linear read of the channels, then one linear map of the flattened window:
        # the forecast stays linear in the framed inputs (no norm or activation between)
        self.read = InputReader(info, info.channels, window)
        self.head = TaskHead(SequenceHead(pool="flatten"), info, info.channels, causal=True,
                             window=window, norm=False)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        return self.read(x)

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(z, x)


class CNNBaseline(Baseline):
    inputs, tasks = ("image",), ("classify",)

    def __init__(self, info: DataInfo, deq: DEQ, *, width: int = 64, layers: int = 2):
        super().__init__(info, deq)
        c = info.channels
        self.register_buffer("mean", torch.tensor(info.mean).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(info.std).view(1, c, 1, 1))
        blocks, ch = [], c
        for _ in range(layers):
            for _ in range(2):
                blocks += [nn.Conv2d(ch, width, 3, padding=1, bias=False),
                           nn.GroupNorm(min(8, width), width), nn.ReLU()]
                ch = width
            blocks.append(nn.MaxPool2d(2, ceil_mode=True))
        self.body = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(width, info.num_classes)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.out(z)


def baseline_for(info: DataInfo, deq: DEQ) -> Baseline:
    """The baseline of the data's kind, sized by deq.baseline (ModelError: none fits)."""
    fits = [c for c in (CNNBaseline, LinearForecaster, GRUBaseline)
            if info.inputs in c.inputs and info.task in c.tasks]
    if not fits:
        raise ModelError(f"deq.mode=baseline: no classic baseline reads {info.inputs} inputs "
                         f"for {info.task} (data {info.name}); set the DEQ against its "
                         f"unrolled twin instead (deq.mode=unrolled)")
    cls = fits[0]
    cfg = deq.settings.baseline
    sizes = {"width": cfg.width, **({"layers": cfg.layers} if cfg.layers else {})}
    return cls(info, deq, **sizes)
