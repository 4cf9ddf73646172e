"""What sequence DEQs share: reading the input (token ids or values, normalised inside the
model), variational dropout masks, and one head per task. The cells live in
transformer.py and tcn.py.

Input: int64 token ids (N, L), or float values (N, L, C) in the data's own units.
Output: lm (N, L, vocab) next-token logits (with `model.adaptive`: log-probabilities, or
while training the adaptive softmax's LazyLogProbs; models/adaptive.py); classify
(N, classes) logits; tag (N, L, classes) logits at every position; forecast the target
shape (e.g. (N, horizon, channels)) in the data's own units.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data import DataInfo
from ..options import Block
from .adaptive import Adaptive, AdaptiveEmbedding, AdaptiveSoftmax


MAX_AUTO_TOKENS = 32            # model.patch=auto: tokens of a sequence at most


class SequenceHead(Block):
    """The `head` option of sequence models: how the fixed point becomes the output."""

    pool: Literal["mean", "last", "flatten"] = Field(
        "mean", description="classify / forecast: how the sequence's states become one "
        "vector (flatten: all positions, fixed length; causal forecasts default to last); "
        "lm and tag read every position apart")
    window_norm: Literal["none", "last", "last_std"] = Field(
        "last", description="forecast: read each continued channel relative to the "
        "window's last value (last), also in units of the window's spread (last_std, as "
        "RevIN), and predict in the same frame; none: the data's global scale only")


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


class WindowNorm(nn.Module):
    """How a forecaster reads the channels it continues (DataInfo.target_channels):
    "none": in the data's global scale; "last": relative to each window's last value, so
    the model sees a window's shape, never its level, and predicts the change from it (a
    trend the training rows never reached is then no extrapolation); "last_std": the same
    in units of each window's own spread (as RevIN), so a faster-rising window gets a
    proportionally steeper forecast. Other channels and other tasks: untouched."""

    def __init__(self, mode: str, info: DataInfo):
        super().__init__()
        self.mode = mode if info.task == "forecast" and info.baselines else "none"
        self.channels = list(info.target_channels or ())
        self.register_buffer("index", torch.tensor(self.channels, dtype=torch.int64),
                             persistent=False)

    def frame(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(origin, unit) per sample for the continued channels of raw x (N, L, C), in the
        units of `mean` / `std` (per continued channel): shapes (N, 1, c)."""
        v = (x[:, :, self.channels] - mean) / std
        unit = v.std(dim=1, keepdim=True).clamp_min(1e-3) if self.mode == "last_std" \
            else torch.ones_like(v[:, -1:])
        return v[:, -1:], unit

    def read(self, v: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
             ) -> torch.Tensor:
        """Globally scaled inputs v (N, L, C) with the continued channels re-framed."""
        if self.mode == "none":
            return v
        origin, unit = self.frame(x, mean[self.channels], std[self.channels])
        framed = (v[:, :, self.channels] - origin) / unit
        return v.index_copy(2, self.index, framed)

    def write(self, y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
              ) -> torch.Tensor:
        """Head outputs y (N, H, c) in the frame -> the targets' global scale."""
        if self.mode == "none":
            return y
        origin, unit = self.frame(x, mean, std)
        return y * unit + origin


class InputReader(nn.Module):
    """Token ids -> embeddings; values -> (values - mean) / std, framed by the WindowNorm,
    -> tokens of `patch` steps each. patch 1: a linear map of each step. patch p > 1: a
    convolution over time of width 4p - 1 (a patch and 1.5 patches either side), GELU,
    averaged over each patch's p steps. A convolution, not a linear map of each patch's
    raw values (PatchTST): that one must learn a pattern at each of its p offsets in a
    patch separately, and on a few hundred sequences it memorises instead (Two Patterns,
    400 sequences: 84% test accuracy at 100% train in patches of 8; the convolution in
    patches of 4: 100%).
    `adaptive`: an adaptive input embedding of the token ids (language models).
    Returns (N, ceil(L / patch), width)."""

    def __init__(self, info: DataInfo, width: int, window: WindowNorm, patch: int = 1,
                 adaptive: Adaptive | None = None):
        super().__init__()
        self.tokens, self.patch = info.inputs == "tokens", patch
        check_adaptive(adaptive, info)
        if self.tokens:
            self.embed = nn.Embedding(info.vocab_size, width) if adaptive is None \
                else AdaptiveEmbedding(info.vocab_size, width, adaptive)
            return
        self.register_buffer("mean", torch.tensor(info.mean))
        self.register_buffer("std", torch.tensor(info.std))
        self.embed = nn.Linear(info.channels, width) if patch == 1 else \
            nn.Conv1d(info.channels, width, 4 * patch - 1, padding=2 * patch - 1)
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            return self.embed(x)
        v = self.window.read((x - self.mean) / self.std, x, self.mean, self.std)
        if self.patch == 1:
            return self.embed(v)
        # p - 1 more steps at the data's mean (0 once normalised) complete a partial last
        # patch; the pooling drops what no patch needs (no modulo, which torch.export refuses)
        v = F.pad(v.transpose(1, 2), (0, self.patch - 1))
        return F.avg_pool1d(F.gelu(self.embed(v)), self.patch).transpose(1, 2)


def patch_for(patch: int | str, info: DataInfo, name: str) -> int:
    """The model's steps per token: `patch`, or for "auto" the fewest that leave at most
    MAX_AUTO_TOKENS tokens (1 up to that length), so one recipe keeps its cost and its
    attention span on longer sequences. Token ids, language models and taggers (an
    output per step): one per step."""
    per_step = info.inputs == "tokens" or info.task in ("lm", "tag")
    if patch == "auto":
        return 1 if per_step else math.ceil(info.length / MAX_AUTO_TOKENS)
    if patch > 1 and per_step:
        raise ValueError(f"model.patch={patch}: {name} reads token ids, language models "
                         "and taggers one step per token; patches are for value sequences")
    return patch


def check_adaptive(adaptive: Adaptive | None, info: DataInfo) -> None:
    """Raise ValueError unless `model.adaptive` is unset or the data is tokens for lm."""
    if adaptive is not None and (info.task != "lm" or info.inputs != "tokens"):
        raise ValueError(f"model.adaptive: an adaptive embedding and softmax are for "
                         f"language models over token ids; data {info.name} is "
                         f"{info.inputs} for {info.task}")


class TaskHead(nn.Module):
    """Features (N, T, width) of the fixed point -> the task's output; T is `tokens`, by
    default the data's length (a flattening head needs it). `adaptive`: an adaptive
    softmax (lm), reading the tensors of `embedding` (the InputReader's) when it ties."""

    def __init__(self, cfg: SequenceHead, info: DataInfo, width: int, causal: bool,
                 window: WindowNorm, norm: bool = True, tokens: int | None = None,
                 adaptive: Adaptive | None = None, embedding: nn.Module | None = None):
        super().__init__()
        check_adaptive(adaptive, info)
        if cfg.pool == "flatten" and info.task in ("lm", "tag"):
            what = "a language model" if info.task == "lm" else "a tagger"
            raise ValueError(f"model.head.pool=flatten: {what} predicts at every position "
                             f"(and so reads any length); flatten is for classify and forecast")
        self.task = info.task
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        # a causal state sees the whole window only at its last position
        self.pool = "last" if causal and self.task == "forecast" and cfg.pool == "mean" else cfg.pool
        features = width * (tokens or info.length) if self.pool == "flatten" else width
        if self.task == "lm" and adaptive is not None:
            self.out = AdaptiveSoftmax(width, info.vocab_size, adaptive,
                                       embedding if adaptive.tie else None)
        elif self.task == "lm":
            self.out = nn.Linear(width, info.vocab_size)
        elif self.task == "tag":
            self.out = nn.Linear(width, info.num_classes)
        elif self.task == "classify":
            self.out = nn.Linear(features, info.num_classes)
        else:
            self.target_shape = tuple(info.target_shape)
            self.out = nn.Linear(features, math.prod(self.target_shape))
            self.register_buffer("target_mean", torch.tensor(info.target_mean))
            self.register_buffer("target_std", torch.tensor(info.target_std))
            self.window = window

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.task in ("lm", "tag"):            # an output at every position
            return self.out(self.norm(h))
        if self.pool == "flatten":
            y = self.out(self.norm(h).flatten(1))
        else:
            y = self.out(self.norm(h[:, -1] if self.pool == "last" else h.mean(dim=1)))
        if self.task == "classify":
            return y
        y = y.view(-1, *self.target_shape)
        # (N, H, C) targets continue channels; (N, H) ones continue the single channel
        framed = self.window.write(y if y.dim() == 3 else y.unsqueeze(-1), x,
                                   self.target_mean, self.target_std).view_as(y)
        return framed * self.target_std + self.target_mean


def causal_for(cfg_causal: bool | None, info: DataInfo) -> bool:
    """The recipe's model.causal, or by task: causal for lm and forecast, bidirectional
    for classify and tag (a tag may depend on the whole sequence)."""
    if cfg_causal is None:
        return info.task in ("lm", "forecast")
    if not cfg_causal and info.task == "lm":
        raise ValueError("model.causal=false: a language model must not see the tokens it "
                         "predicts; leave model.causal unset or true")
    return cfg_causal


def takes_any_length(info: DataInfo, head: SequenceHead) -> bool:
    """Whether a sequence model reads inputs of any length: a forecast reads a fixed
    window, and a flattening head every position of one (lm and tag refuse it)."""
    return info.task != "forecast" and head.pool != "flatten"


def check_inputs(info: DataInfo, name: str) -> None:
    """Raise ValueError unless `info` describes sequence data (tokens or values)."""
    if info.inputs not in ("tokens", "sequence"):
        raise ValueError(f"model.name={name} reads sequences; data {info.name} holds "
                         f"{info.inputs}s (use resnet_deq)")
