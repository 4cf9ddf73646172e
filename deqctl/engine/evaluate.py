"""Evaluation of a DEQ model on a data split with any test-time solver settings."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..data import Split, iterate_batches, num_batches
from ..implicit import SolveSpec
from ..models import DEQModel
from ..models.adaptive import lazy_log_probs
from ..tasks import Task
from ..keys import K
from .device import autocast
from .metrics import Accumulator, step_stats, with_stop_reason


@torch.inference_mode()
def evaluate(model: DEQModel, task: Task, split: Split, batch_size: int, *,
             device: torch.device, solver: SolveSpec | None = None, split_name: str = "test",
             precision: str = "fp32", on_batch: Callable[[int, int], None] | None = None,
             merge: Callable[[dict], dict] | None = None) -> dict[str, Any]:
    """Return one metrics row (loss, the task's metrics, solver statistics, throughput)
    for `split`. `solver` replaces the model's eval settings; `precision` is the recipe's
    runtime.precision (autocast, as in training); `on_batch(done, total)` reports progress;
    `merge` combines the statistics of every rank's shard (torchrun) before the metrics."""
    was_training = model.training
    model.eval()
    try:
        acc = Accumulator()
        total = num_batches(split, batch_size, drop_last=False)
        start = time.perf_counter()
        for i, (x, y) in enumerate(iterate_batches(split, batch_size, shuffle=False,
                                                   device=device)):
            # an adaptive softmax scores the targets without the (N, L, V) log-probs
            with autocast(device, precision), lazy_log_probs(model):
                out = model.run(x, solver=solver)
            acc.add(step_stats(out, task.loss(out.out.float(), y),
                               task.stats(out.out.float(), x, y)))
            if on_batch:
                on_batch(i + 1, total)
        row = acc.reduce()
        row = task.finish(with_stop_reason(merge(row) if merge else row), split)
        elapsed = time.perf_counter() - start
    finally:           # an evaluation cut short by a signal leaves the model as it was
        model.train(was_training)
    return {K.split: split_name, **row, K.samples_per_s: row[K.n] / elapsed,
            K.eval_time_s: elapsed}
