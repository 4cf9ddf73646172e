"""`lm`: next-token prediction at every position. Cross-entropy in nats per token; bits
per character (bpc = loss / ln 2, tokens being characters or bytes) and perplexity.

A model's output is next-token logits (N, L, V) (or log-probabilities: the same loss), or,
from an adaptive softmax while training or evaluating, an object whose `nll(y)` is that
loss computed from the targets without the (N, L, V) tensor (models/adaptive.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ui.fmt import fmt_float
from .base import Metric, Task


class LanguageModel(Task):
    name = "lm"
    output_name = "logits"
    metrics = (Metric("bpc", "bpc", fmt_float), Metric("ppl", "ppl", fmt_float))

    def loss(self, out, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            return out.nll(y)
        return F.cross_entropy(out.float().flatten(0, -2), y.flatten())

    def finish(self, row):
        loss = row.get("loss")
        if loss is not None and math.isfinite(loss):
            row["bpc"] = loss / math.log(2.0)
            row["ppl"] = math.exp(loss) if loss < 700 else math.inf   # exp overflows past ~709
        return row

    def agree(self, a, b):
        return a.argmax(dim=-1) == b.argmax(dim=-1)
