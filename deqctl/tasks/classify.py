"""`classify`: one class per input (images, sequences). Cross-entropy, accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ui.fmt import fmt_pct
from .base import Metric, Task


class Classify(Task):
    name = "classify"
    output_name = "logits"
    metrics = (Metric("accuracy", "acc", fmt_pct, higher_is_better=True, unit_interval=True),)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y)

    def stats(self, out, x, y):
        return {"accuracy": (out.argmax(dim=-1) == y).float().mean()}

    def agree(self, a, b):
        return a.argmax(dim=-1) == b.argmax(dim=-1)
