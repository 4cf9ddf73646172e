"""`transformer_deq`: a DEQ-Transformer (Bai, Kolter, Koltun, 2019). One weight-tied block
of multi-head self-attention and a feed-forward layer, with the embedded input injected
at every application, solved to its fixed point.

    post-LN (default): a = z + u;  h = LN(a + Attn(a));      f = LN(h + FF(h))
    pre-LN:                         h = u + Attn(LN(z + u));  f = h + FF(LN(h))

Post-LN bounds every application's output, which keeps the solve well posed. The pre-LN
cell's residual stream starts at the injection u, not at z: a residual from z would make
df/dz = I + ..., whose spectral radius is about 1 or more, so plain iteration could not
converge; z enters only through a LayerNorm, so f is bounded in z and a fixed point
exists, but its output scale is free (pre-LN DEQs are known to be less stable; offered
to compare). Attention is causal for lm and forecast, bidirectional for classify unless
the recipe says otherwise. State: (N, L, d_model).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

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
from .sequence import (InputReader, SequenceHead, TaskHead, WindowNorm, causal_for,
                       check_inputs, patch_for, sinusoidal_positions, takes_any_length)


class AttentionCell(nn.Module):
    """f(z, u): one transformer block applied to z + u. Per sample (LayerNorm only), so
    the solvers' `compact` option may skip converged samples."""

    def __init__(self, d: int, heads: int, ff: int, pre: bool, norm: str,
                 init_std: float | None, dropout: float, causal: bool):
        super().__init__()
        if d % heads:
            raise ValueError(f"model.d_model={d} is not divisible by model.heads={heads}")
        self.heads, self.causal, self.pre = heads, causal, pre
        lin = (lambda i, o: normalised(nn.Linear(i, o), norm, init_std))
        self.qkv, self.proj = lin(d, 3 * d), lin(d, d)
        self.ff1, self.ff2 = lin(d, ff), lin(ff, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.p = dropout
        self.masks: tuple[torch.Tensor, torch.Tensor] | tuple[None, None] = (None, None)

    def draw_masks(self, u: torch.Tensor, training: bool) -> None:
        """Variational dropout on the attention output and the feed-forward hidden layer:
        one mask per sample and channel, shared by all positions and all f calls."""
        if not (training and self.p):
            self.masks = (None, None)
            return
        n = u.shape[0]
        self.masks = (variational_mask((n, 1, u.shape[-1]), self.p, u),
                      variational_mask((n, 1, self.ff1.out_features), self.p, u))

    def attention(self, a: torch.Tensor) -> torch.Tensor:
        n, length, d = a.shape
        q, k, v = self.qkv(a).view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(n, length, d))

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ff2(dropout(F.gelu(self.ff1(h)), self.masks[1]))

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        a = z + u
        if self.pre:
            h = u + dropout(self.attention(self.ln1(a)), self.masks[0])
            return h + self.feed_forward(self.ln2(h))
        h = self.ln1(a + dropout(self.attention(a), self.masks[0]))
        return self.ln2(h + self.feed_forward(h))


@MODELS.register("transformer_deq")
class TransformerDEQ(DEQModel):
    """Input embedding + sinusoidal positions -> DEQ transformer block -> task head.

    `d_model`, `heads`, `d_ff` (feed-forward width), `norm_placement` (LayerNorm before
    or after each sublayer), `causal` (None: causal for lm and forecast, bidirectional
    for classify), `norm`, `init_std`, `dropout` (variational), `head` (SequenceHead),
    `patch` (steps per token of value sequences, or auto; InputReader, patch_for),
    `adaptive` (lm: adaptive input embedding and softmax; models/adaptive.py).
    """

    inputs, tasks = ("tokens", "sequence"), ("classify", "lm", "forecast", "tag")

    def __init__(self, info: DataInfo, deq: DEQ, *, d_model: Annotated[int, Ge(8)] = 128,
                 heads: Count = 4, d_ff: Annotated[int, Ge(8)] = 256,
                 norm_placement: Literal["pre", "post"] = "post", causal: bool | None = None,
                 norm: Norm = "weight", init_std: Positive | None = None, dropout: Rate = 0.0,
                 head: SequenceHead = SequenceHead(), patch: Count | Literal["auto"] = 1,
                 adaptive: Adaptive | None = None):
        check_inputs(info, "transformer_deq")
        super().__init__(info, deq)
        self.per_sample = not dropout
        causal = causal_for(causal, info)
        self.time_axis = 1 if causal else None         # the state is (N, L, d_model)
        window = WindowNorm(head.window_norm, info)
        patch = patch_for(patch, info, "transformer_deq")
        # torch.export cannot yet take a length whose tokens it must count (it guards on
        # ceil(L / patch) != 1 beyond its declared range): a patched model is declared
        # fixed-length, so export and predict take its data's length (the module itself
        # runs at any length)
        self.dynamic_length = takes_any_length(info, head) and patch == 1
        self.reader = InputReader(info, d_model, window, patch, adaptive)
        self.body = AttentionCell(d_model, heads, d_ff, norm_placement == "pre", norm,
                                  init_std, dropout, causal)
        self.head = TaskHead(head, info, d_model, causal, window,
                             tokens=info.length and math.ceil(info.length / patch),
                             adaptive=adaptive, embedding=self.reader.embed)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        e = self.reader(x)
        u = e + sinusoidal_positions(e.shape[1], e.shape[2], e.device, e.dtype)
        self.body.draw_masks(u, self.training)     # once per forward pass, like u itself
        return u

    def cell(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.body(z, u)

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(z, x)
