"""What a task is: the one place that knows what a model's output means. Its loss, the
per-batch statistics and how they become metrics, which direction is better, the live
table's columns and the eval JSON keys all come from here; the engine, the live view and
the commands only ever ask a Task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..data import DataInfo, Split


@dataclass(frozen=True)
class Metric:
    """One reported number: its metrics.jsonl / eval JSON key, its short label (table
    header, plain lines), its format, its direction, and whether the live table shows it."""

    key: str
    label: str
    fmt: Callable[[Any], str]
    higher_is_better: bool = False
    column: bool = True
    unit_interval: bool = False      # lives in [0, 1] (accuracy): 1% of it is one point


class Task:
    """Base class. Subclasses set `name` and `metrics` (the headline first) and define
    `loss`, `stats`, `finish` and `agree`."""

    name: str = ""
    output_name: str = "output"        # what exported graphs call their output
    metrics: tuple[Metric, ...] = ()
    # the output scores classes (logits, class dimension last): a predicted distribution,
    # which a solve can stop on (deq.eval.stop_mode kl or argmax)
    distribution: bool = True

    def __init__(self, info: DataInfo):
        self.info = info
        self._constants: dict[tuple[str, torch.device], torch.Tensor] = {}

    def constant(self, name: str, values: Any, device: torch.device) -> torch.Tensor:
        """Return `values` (numbers, or nested sequences of them) as a tensor on `device`,
        made on first use and kept, so a step copies nothing from the host."""
        key = (name, torch.device(device))
        if key not in self._constants:
            # An ordinary tensor even when an evaluation (torch.inference_mode) asks first:
            # training uses it next, and autograd refuses an inference tensor ("cannot be
            # saved for backward") - as a resume that redoes a cut-short evaluation found.
            with torch.inference_mode(False):
                self._constants[key] = torch.tensor(values, device=device)
        return self._constants[key]

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training criterion: a scalar mean over the batch."""
        raise NotImplementedError

    def stats(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch means as device scalars (no host sync); an interval or an evaluation
        averages them weighted by batch size, then `finish` derives the metrics."""
        return {}

    def finish(self, row: dict[str, Any], split: Split | None = None) -> dict[str, Any]:
        """Return `row` (reduced statistics, "loss" the mean task loss, over `split` when
        known) with the metrics."""
        return row

    def log_probs(self, out: torch.Tensor) -> torch.Tensor:
        """The predicted distribution of output `out` as log-probabilities, class dimension
        last (float32); a task without a distribution (`distribution` False) has none."""
        if not self.distribution:
            raise ValueError(f"a {self.name} output is no distribution over classes")
        return torch.log_softmax(out.float(), dim=-1)

    def agree(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per prediction, whether two outputs for the same inputs agree (export parity)."""
        raise NotImplementedError

    @property
    def headline(self) -> Metric:
        """The metric that says how good a model is."""
        return self.metrics[0]

    def better(self, a: float, b: float) -> bool:
        """True when headline value `a` is better than `b`."""
        return a > b if self.headline.higher_is_better else a < b

    def summary(self, row: dict[str, Any]) -> str:
        """The metrics of a row as one short phrase, e.g. "accuracy 97.9%"."""
        return ", ".join(f"{m.label} {m.fmt(row.get(m.key))}" for m in self.metrics
                         if m.key in row)
