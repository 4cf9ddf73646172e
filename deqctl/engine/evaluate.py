"""Evaluation of a DEQ model on a data split with any test-time solver settings."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..data import Split, iterate_batches, num_batches
from ..implicit import SolveSpec
from ..models import DEQModel
from ..tasks import Task
from .metrics import Accumulator, step_stats


@torch.inference_mode()
def evaluate(model: DEQModel, task: Task, split: Split, batch_size: int, *,
             device: torch.device, solver: SolveSpec | None = None, split_name: str = "test",
             on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Return one metrics row (loss, the task's metrics, solver statistics, throughput)
    for `split`. `solver` replaces the model's eval settings; `on_batch(done, total)`
    reports progress."""
    was_training = model.training
    model.eval()
    acc = Accumulator()
    total = num_batches(split, batch_size, drop_last=False)
    start = time.perf_counter()
    for i, (x, y) in enumerate(iterate_batches(split, batch_size, shuffle=False, device=device)):
        out = model.run(x, solver=solver)
        acc.add(step_stats(out, task.loss(out.out, y), task.stats(out.out, x, y)))
        if on_batch:
            on_batch(i + 1, total)
    row = task.finish(acc.reduce())
    elapsed = time.perf_counter() - start
    model.train(was_training)
    return {"split": split_name, **row, "samples_per_s": row["n"] / elapsed, "eval_time_s": elapsed}
