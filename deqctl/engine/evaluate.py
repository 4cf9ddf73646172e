"""Evaluation of a DEQ model on a data split with any test-time solver settings."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..data import Split, iterate_batches, num_batches
from ..models import DEQModel, ModelOutput
from ..recipe import SolverSettings
from .metrics import Accumulator, step_stats


def criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over samples (or over tokens for (B, L, V) logits)."""
    if logits.dim() > 2:
        logits, targets = logits.flatten(0, -2), targets.flatten()
    return F.cross_entropy(logits.float(), targets)


def objective(out: ModelOutput, targets: torch.Tensor, jac_weight: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (training loss, task loss): the task loss plus fixed-point corrections and
    Jacobian regularisation, and the task loss alone (what the metrics report)."""
    task = criterion(out.out, targets)
    loss = task
    for weight, logits in out.corrections:
        loss = loss + weight * criterion(logits, targets)
    if out.info.jac_loss is not None:
        loss = loss + jac_weight * out.info.jac_loss
    return loss, task


@torch.inference_mode()
def evaluate(model: DEQModel, split: Split, batch_size: int, *, device: torch.device,
             solver: SolverSettings | None = None, split_name: str = "test",
             on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Return one metrics row (loss, accuracy, solver statistics, throughput) for `split`.

    `solver` replaces the recipe's eval settings; `on_batch(done, total)` reports progress.
    """
    was_training = model.training
    model.eval()
    acc = Accumulator()
    total = num_batches(split, batch_size, drop_last=False)
    start = time.perf_counter()
    for i, (x, y) in enumerate(iterate_batches(split, batch_size, shuffle=False, device=device)):
        out = model.run(x, solver=solver)
        acc.add(step_stats(out, criterion(out.out, y), y))
        if on_batch:
            on_batch(i + 1, total)
    row = acc.reduce()
    elapsed = time.perf_counter() - start
    model.train(was_training)
    return {"split": split_name, **row, "samples_per_s": row["n"] / elapsed, "eval_time_s": elapsed}
