"""What sequence DEQs share: reading the input (token ids or values, normalised inside the
model), variational dropout masks, and one head per task. The cells live in
transformer.py and tcn.py.

Input: int64 token ids (N, L), or float values (N, L, C) in the data's own units.
Output: lm (N, L, vocab) next-token logits; classify (N, classes) logits; forecast the
target shape (e.g. (N, horizon, channels)) in the data's own units.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data import DataInfo
from ..recipe import SequenceHead


def sinusoidal_positions(length: int, width: int, device: torch.device,
                         dtype: torch.dtype) -> torch.Tensor:
    """The (length, width) sinusoidal position code of "Attention is all you need"; made
    on the fly, so a model takes any length (and exports with a dynamic one)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / width))
    code = torch.zeros(length, width, device=device)
    code[:, 0::2] = torch.sin(pos * freq)
    code[:, 1::2] = torch.cos(pos * freq)[:, :width // 2]
    return code.to(dtype)


def variational_mask(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """A dropout mask drawn once per forward pass and shared by every f call of the solve
    and its backward: the solver then iterates one fixed map (a fresh mask per call, as
    nn.Dropout draws, moves the fixed point under the solver)."""
    keep = 1.0 - p
    return torch.bernoulli(torch.full(shape, keep, dtype=like.dtype, device=like.device)) / keep


class InputReader(nn.Module):
    """Token ids -> embeddings; values -> (values - mean) / std -> linear. Returns (N, L, width)."""

    def __init__(self, info: DataInfo, width: int):
        super().__init__()
        self.tokens = info.inputs == "tokens"
        if self.tokens:
            self.embed = nn.Embedding(info.vocab_size, width)
        else:
            self.register_buffer("mean", torch.tensor(info.mean))
            self.register_buffer("std", torch.tensor(info.std))
            self.embed = nn.Linear(info.channels, width)

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """Values in units of the training data's per-channel spread."""
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x if self.tokens else self.scaled(x))


class TaskHead(nn.Module):
    """Features (N, L, width) of the fixed point -> the task's output."""

    def __init__(self, cfg: SequenceHead, info: DataInfo, width: int, causal: bool):
        super().__init__()
        self.task = info.task
        self.norm = nn.LayerNorm(width)
        # a causal state sees the whole window only at its last position
        self.pool = "last" if causal and self.task == "forecast" else cfg.pool
        if self.task == "lm":
            self.out = nn.Linear(width, info.vocab_size)
        elif self.task == "classify":
            self.out = nn.Linear(width, info.num_classes)
        else:
            self.target_shape = tuple(info.target_shape)
            self.out = nn.Linear(width, math.prod(self.target_shape))
            self.register_buffer("target_mean", torch.tensor(info.target_mean))
            self.register_buffer("target_std", torch.tensor(info.target_std))
            self.from_last = cfg.from_last and info.baselines
            self.target_channels = list(info.target_channels or ())

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.task == "lm":
            return self.out(self.norm(h))
        v = h[:, -1] if self.pool == "last" else h.mean(dim=1)
        y = self.out(self.norm(v))
        if self.task == "classify":
            return y
        y = y.view(-1, *self.target_shape)
        if self.from_last:
            # predict the change from the last observation: a trend the training rows never
            # reached (a rising series) is then no extrapolation for the network
            last = (x[:, -1, self.target_channels] - self.target_mean) / self.target_std
            y = y + (last.unsqueeze(1) if y.dim() == 3 else last)         # (N, [1,] C)
        return y * self.target_std + self.target_mean


def causal_for(cfg_causal: bool | None, info: DataInfo) -> bool:
    """The recipe's model.causal, or by task: causal for lm and forecast."""
    if cfg_causal is None:
        return info.task in ("lm", "forecast")
    if not cfg_causal and info.task == "lm":
        raise ValueError("model.causal=false: a language model must not see the tokens it "
                         "predicts; leave model.causal unset or true")
    return cfg_causal


def check_inputs(info: DataInfo, name: str) -> None:
    """Raise ValueError unless `info` describes sequence data (tokens or values)."""
    if info.inputs not in ("tokens", "sequence"):
        raise ValueError(f"model.name={name} reads sequences; data {info.name} holds "
                         f"{info.inputs}s (use resnet_deq)")


def dropout(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


