"""`tag`: one class at every position of a sequence or every pixel of an image (prefix
sums: the running parity of a bit string; mazes: whether a pixel is on the path).
Cross-entropy over every position; two accuracies, both higher-is-better:

- `solved`: the fraction of samples with every position right, the headline (what
  Schwarzschild et al. 2021 and Anil et al. 2022 report: a string or a maze is solved or
  it is not);
- `accuracy`: the fraction of positions right.

A model's output is logits (N, *positions, classes) for targets (N, *positions): (N, L)
for sequences, (N, H, W) for images. Samples of a split have one shape, so a batch's
mean over positions, weighted by its samples, is the split's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ui.fmt import fmt_pct
from .base import Metric, Task


class Tag(Task):
    name = "tag"
    output_name = "logits"
    metrics = (Metric("solved", "solved", fmt_pct, higher_is_better=True, unit_interval=True),
               Metric("accuracy", "acc", fmt_pct, higher_is_better=True, unit_interval=True))

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float().flatten(0, -2), y.flatten())

    def stats(self, out, x, y):
        right = (out.argmax(dim=-1) == y).flatten(1)                 # (N, positions)
        return {"accuracy": right.float().mean(), "solved": right.all(dim=1).float().mean()}

    def agree(self, a, b):
        # one answer per sample: the same class at every position
        return (a.argmax(dim=-1) == b.argmax(dim=-1)).flatten(1).all(dim=1)
