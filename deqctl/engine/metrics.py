"""Step statistics gathered on the device and read back once per logging interval,
plus the metrics.jsonl sink."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Callable

import torch

from ..models import ModelOutput
from ..files import open_regular
from ..keys import K, over_batches
from ..solvers import NONFINITE


def step_stats(out: ModelOutput, loss: torch.Tensor, task: dict[str, torch.Tensor]
               ) -> dict[str, Any]:
    """Per-step statistics as device tensors (no host sync) or host numbers: the task loss,
    the task's own statistics (`Task.stats`) and the solver's."""
    fwd, bwd = out.info.forward, out.info.backward
    stats: dict[str, Any] = {
        K.loss: loss.detach().float(),
        **{k: v.detach().float() for k, v in task.items()},
        K.n: int(fwd.sample_nfe.numel()),
        K.fwd_nfe: fwd.sample_nfe.float().mean(),
        K.fwd_nfe_max: fwd.nfe,
        K.fwd_abs_residual: fwd.abs_residual.float().mean(),
        K.fwd_abs_residual_max: fwd.abs_residual.float().max(),
        K.fwd_rel_residual: fwd.rel_residual.float().mean(),
        K.fwd_rel_residual_max: fwd.rel_residual.float().max(),
        K.fwd_converged: fwd.converged.float().mean(),
        K.nonfinite: (fwd.status == NONFINITE).sum(),
        K.fallbacks: fwd.fallbacks.sum(),
    }
    if fwd.bf16_nfe:       # a mixed-precision solve: how many of fwd_nfe_max ran in bf16
        stats[K.fwd_nfe_bf16] = fwd.bf16_nfe
    if out.info.depth is not None:      # deq.mode=recurrent: this step's drawn depth
        stats[K.depth] = out.info.depth
    if out.info.jac_loss is not None:   # ||df/dz||_F^2 / dim, on the steps that estimate it
        stats[K.jac_loss] = out.info.jac_loss.detach().float()
    if bwd is not None:
        stats[K.bwd_nfe] = bwd.nfe
        stats[K.bwd_rel_residual] = bwd.rel_residual.float().mean()
        stats[K.bwd_rel_residual_max] = bwd.rel_residual.float().max()
    elif out.info.backward_steps is not None:   # phantom / jfb: no equation solved, no residual
        stats[K.bwd_nfe] = out.info.backward_steps
        stats[K.bwd_rel_residual] = stats[K.bwd_rel_residual_max] = math.nan
    return stats


ROW_LIMIT = 2**20        # bytes in one metrics row; real rows hold a few hundred


class Accumulator:
    """Collects step statistics and reduces them to one metrics row with a single sync;
    each key as the metrics table (deqctl.keys) says."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.step_losses: list[float] = []     # the last reduced interval's, step by step

    def add(self, stats: dict[str, Any]) -> None:
        self.rows.append(stats)

    def __len__(self) -> int:
        return len(self.rows)

    def snapshot(self) -> list[dict[str, float]]:
        """The steps gathered so far as host numbers (a sync point), without resetting:
        a checkpoint stores them so a resumed run's next row covers the same steps."""
        return [{k: (v.item() if torch.is_tensor(v) else v) for k, v in r.items()}
                for r in self.rows]

    def reduce(self) -> dict[str, Any]:
        """Return the interval's row (means, maxima, sums) and reset. This is a sync point."""
        # A key missing from some steps (e.g. jac_loss with jacobian_reg.every > 1) is
        # reduced over the steps that have it.
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        cols = {k: [r for r in self.rows if k in r] for k in keys}
        # One transfer for everything: stack all device scalars, then .tolist().
        flat = [r[k] for k in keys for r in cols[k]]
        dev = next((v.device for v in flat if torch.is_tensor(v)), torch.device("cpu"))
        # float64 where the device has it (mps does not), else float32 until on the host
        wide = torch.float32 if dev.type == "mps" else torch.float64
        host = torch.stack([torch.as_tensor(v, device=dev).to(wide) for v in flat]).tolist()
        out: dict[str, Any] = {}
        i = 0
        for k in keys:
            col, sizes = host[i:i + len(cols[k])], [r[K.n] for r in cols[k]]
            i += len(col)
            if k == K.loss:           # the loss-spike detector reads them, no second transfer
                self.step_losses = col
            how = over_batches(k)
            if how == "max":
                out[k] = max(col)
            elif how == "sum":
                out[k] = int(sum(col))
            else:  # weighted by batch size, so a short last batch counts for what it holds
                out[k] = sum(c * n for c, n in zip(col, sizes)) / sum(sizes)
        self.rows = []
        if K.loss not in keys:
            self.step_losses = []
        return out


def with_stop_reason(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with fwd_stop, the worst stop reason of its solves (after any merge of ranks:
    one rank's NaN is the row's)."""
    if K.fwd_converged in row:
        row[K.fwd_stop] = ("nonfinite" if row.get(K.nonfinite) else
                           "conv" if row[K.fwd_converged] >= 1 else "max_iter")
    return row


class MetricsWriteError(RuntimeError):
    """metrics.jsonl could not be appended to (a full disk, a quota); the row was taken
    back out, so the file holds whole rows only."""


class JsonlSink:
    """Appends one JSON object per line and flushes, so a crash loses no logged row; a
    failed write is cut back off, so a full disk never leaves half a row."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}
        line = (json.dumps(clean) + "\n").encode()
        with _append(self.path) as fh:
            start = fh.tell()
            try:
                fh.write(line)
                fh.flush()
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.truncate(self.path, start)
                raise MetricsWriteError(
                    f"cannot append to {self.path} ({exc.strerror or exc}); training "
                    f"stopped and the run's checkpoints are intact: make room, then "
                    f"deqctl train --resume {self.path.parent}") from None


def _append(path: Path):
    """The run's metrics file opened for appending: a regular file of its own, never
    followed through a symlink and never a FIFO to block on."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MetricsWriteError(f"{path} is not a regular file; a run's metrics are its own")
    return os.fdopen(fd, "ab")


def read_rows(path: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A last line cut off by a crash is left out, with one
    warning naming it; any other line that is not a JSON row with an integer `step` and
    a `split` is a ValueError naming its line number. Lines are read one at a time (no
    row is longer than ROW_LIMIT), so a huge file never sits in memory whole."""
    rows: list[dict[str, Any]] = []
    bad: tuple[int, str] | None = None
    with open_regular(path) as fh:
        for number, raw in enumerate(iter(lambda: fh.readline(ROW_LIMIT + 1), b""), start=1):
            if bad is not None:              # a broken line that was not the last one
                raise ValueError(f"{path}: line {bad[0]} {bad[1]}")
            if not raw.strip():
                continue
            why = _row_problem(raw)
            if why is None:
                rows.append(json.loads(raw))
            else:
                bad = (number, why)
    if bad is not None and warn is not None:
        warn(f"{path}: line {bad[0]} {bad[1]} (cut off by a crash?); read up to the line before")
    return rows


def _row_problem(raw: bytes) -> str | None:
    if len(raw) > ROW_LIMIT:
        return f"is longer than {ROW_LIMIT} bytes"
    try:
        row = json.loads(raw)
    except (ValueError, RecursionError):
        return "is not JSON"
    if not isinstance(row, dict) or not isinstance(row.get("split"), str) or \
            not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
        return "is not a metrics row (needs an integer step and a split)"
    return None
