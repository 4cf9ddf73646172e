"""`lm`: next-token prediction at every position. Cross-entropy in nats per token; bits
per character (bpc = loss / ln 2, tokens being characters or bytes) and perplexity."""

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

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float().flatten(0, -2), y.flatten())

    def finish(self, row):
        loss = row.get("loss")
        if loss is not None and math.isfinite(loss):
            row["bpc"] = loss / math.log(2.0)
            row["ppl"] = math.exp(loss) if loss < 700 else math.inf   # exp overflows past ~709
        return row

    def agree(self, a, b):
        return a.argmax(dim=-1) == b.argmax(dim=-1)
