"""A trained model's predictions, a batch at a time, as rows: the class (with its
probability and the next `top_k - 1`) or the forecast values per channel in the data's
units, beside that input's own solve (NFE, relative residual, converged).

Inputs are batched exactly as `eval` batches a split (in order, `batch_size` at a time),
and solved with the same settings under the same autocast, so on the same inputs the
predictions are eval's predictions."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ..data import DataInfo
from ..engine.device import autocast
from ..implicit import SolveSpec
from ..models import DEQModel
from .inputs import Item

SOLVE_COLUMNS = ("nfe", "rel_residual", "converged")


class Predictor:
    """Rows of predictions for a model, its test-time `solver`, on `device`."""

    def __init__(self, model: DEQModel, *, device: torch.device, solver: SolveSpec,
                 precision: str = "fp32", batch_size: int = 256, top_k: int = 1):
        self.model, self.info = model.eval(), model.info
        self.device, self.solver, self.precision = device, solver, precision
        self.batch_size = batch_size
        self.top_k = max(1, min(top_k, self.info.num_classes or 1))
        self.channels = _channel_names(self.info)
        self.columns = self._columns()

    def _columns(self) -> list[str]:
        if self.info.task == "classify":
            extra = [c for k in range(2, self.top_k + 1)
                     for c in (f"prediction_{k}", f"probability_{k}")]
            return ["input", "prediction", "probability", *SOLVE_COLUMNS, *extra]
        return ["input", "time", *self.channels, *SOLVE_COLUMNS]

    def rows(self, items: Iterable[Item]) -> Iterator[tuple[list[Item], list[dict[str, Any]]]]:
        """(the items of a batch, their rows), batch by batch: `batch_size` items at a
        time, a batch closed early where the input shape changes (sequences of several
        lengths for a model that takes any)."""
        batch: list[Item] = []
        for item in items:
            if batch and (len(batch) == self.batch_size or item.x.shape != batch[0].x.shape
                          or item.x.dtype != batch[0].x.dtype):
                yield batch, self._predict(batch)
                batch = []
            batch.append(item)
        if batch:
            yield batch, self._predict(batch)

    @torch.inference_mode()
    def _predict(self, items: list[Item]) -> list[dict[str, Any]]:
        x = torch.stack([i.x for i in items]).to(self.device)
        if x.dtype == torch.uint8:       # pixels, as iterate_batches hands them to a model
            x = x.to(torch.float32).div_(255.0)
        with autocast(self.device, self.precision):
            out = self.model.run(x, solver=self.solver)
        fwd = out.info.forward
        solves = [dict(zip(SOLVE_COLUMNS, s)) for s in zip(
            fwd.sample_nfe.tolist(), _short(fwd.rel_residual), fwd.converged.tolist())]
        values = out.out.float()
        if self.info.task == "classify":
            return self._classes(items, values, solves)
        return self._forecasts(items, values, solves)

    def _classes(self, items, logits, solves) -> list[dict[str, Any]]:
        probs, ids = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
        rows = []
        for item, p, c, solve in zip(items, _short(probs), ids.tolist(), solves):
            row = {"input": item.name, "prediction": self.info.class_name(c[0]),
                   "probability": p[0], **solve}
            for k in range(1, self.top_k):
                row[f"prediction_{k + 1}"] = self.info.class_name(c[k])
                row[f"probability_{k + 1}"] = p[k]
            rows.append(row)
        return rows

    def _forecasts(self, items, values, solves) -> list[dict[str, Any]]:
        steps = values.reshape(values.shape[0], -1, len(self.channels))    # (N, steps, C)
        rows = []
        for item, v, solve in zip(items, _short(steps), solves):
            times = item.times or [f"+{h + 1}" for h in range(len(v))]
            rows.extend({"input": item.name, "time": t, **dict(zip(self.channels, step)),
                         **solve} for t, step in zip(times, v))
        return rows


def _channel_names(info: DataInfo) -> list[str]:
    """A forecast's value columns: the data's column names, else y0, y1, ... per target
    channel (the last axis of a (horizon, channels) target; one for a (horizon,) one)."""
    shape = info.target_shape
    count = shape[-1] if len(shape) >= 2 else 1
    if len(info.columns) == count:
        return list(info.columns)
    return ["y"] if count == 1 else [f"y{c}" for c in range(count)]


def _short(t: torch.Tensor) -> list:
    """`t` as nested lists of the shortest decimals that read back as the same float32
    (322.96442, not 322.96441650390625): what the model computed, and no more digits."""
    a = t.detach().float().cpu().numpy()
    return np.array([float(str(v)) for v in a.reshape(-1)]).reshape(a.shape).tolist()
