"""Data-parallel training across processes started by `torchrun` (gloo on CPUs, nccl on
CUDA): each rank computes its contiguous slice of every global batch, gradients are
averaged with one all-reduce per step (weighted by slice size, so the update equals the
single-process one on the same global batch), statistics are merged into one row per step,
evaluation is sharded, and rank 0 alone writes.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op on one process.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..data import Split
from ..keys import K, over_ranks


@dataclass(frozen=True)
class Group:
    """This process's place: `rank` of `world` processes (world 1: no torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0


def join(device_setting: str) -> Group:
    """Join the torchrun process group when there is one; returns this process's Group.
    On CUDA each rank takes the GPU of its LOCAL_RANK (runtime.device stays auto/cuda) and
    nccl joins them; with more ranks on a node than GPUs, ranks share GPUs round-robin and
    gloo joins them (nccl refuses two ranks on one device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device_setting in ("auto", "cuda")
        shared = False
        if cuda:
            gpus, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", "0"))
            shared = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > gpus
            torch.cuda.set_device(local % gpus)
        dist.init_process_group("nccl" if cuda and not shared else "gloo")
    return Group(dist.get_rank(), dist.get_world_size())


def leave(group: Group) -> None:
    if group.active and dist.is_initialized():
        dist.destroy_process_group()


def shard(group: Group, n: int) -> slice:
    """This rank's contiguous part of n items (sizes differ by at most one)."""
    lo = n * group.rank // group.world
    hi = n * (group.rank + 1) // group.world
    return slice(lo, hi)


def shard_split(group: Group, split: Split) -> Split:
    """This rank's part of an evaluation split."""
    if not group.active:
        return split
    return split.rows(shard(group, len(split)))


def average_gradients(group: Group, model: torch.nn.Module, share: float) -> None:
    """Replace each gradient by the all-ranks sum of share x gradient, share being this
    rank's fraction of the global batch: the gradient of the global batch mean."""
    if not group.active:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                        device=params[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads]) * share
    dist.all_reduce(flat)
    dist.all_reduce(used)      # a parameter no rank used keeps no gradient, as alone
    offset = 0
    for p, any_used in zip(params, used.tolist()):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone() if any_used else None
        offset += n


def all_ranks(group: Group, flag: torch.Tensor) -> torch.Tensor:
    """A device bool that is True only where it is True on every rank (no host sync)."""
    if not group.active:
        return flag
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0].bool()


def any_rank(group: Group, flag: bool, device: torch.device) -> bool:
    """True when `flag` is set on any rank (a signal reached one of them)."""
    if not group.active:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()


def broadcast(group: Group, value: Any) -> Any:
    """Rank 0's value on every rank (e.g. a run directory named after the start time)."""
    if not group.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(group: Group, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank ([value] alone)."""
    if not group.active:
        return [value]
    values: list[Any] = [None] * group.world
    dist.all_gather_object(values, value)
    return values


def merge_rows(group: Group, row: dict[str, Any]) -> dict[str, Any]:
    """One metrics row from every rank's row of the same interval: counts and throughput
    summed, maxima and times as the slowest rank saw them, means weighted by samples."""
    if not group.active:
        return row
    rows: list[dict[str, Any]] = [{} for _ in range(group.world)]
    dist.all_gather_object(rows, row)
    n = [r.get(K.n, 0) for r in rows]
    total = sum(n) or 1
    out: dict[str, Any] = {}
    for key, value in row.items():
        values = [r.get(key) for r in rows]
        numbers = [v for v in values if _number(v)]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            out[key] = math.nan                 # one rank's NaN is the row's NaN
        elif not _number(value) or len(numbers) != len(values):
            out[key] = value
        elif over_ranks(key) == "sum":
            out[key] = type(value)(sum(numbers))
        elif over_ranks(key) in ("max", "same"):
            out[key] = max(numbers)
        else:
            out[key] = sum(v * k for v, k in zip(numbers, n)) / total
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and \
        (not isinstance(v, float) or math.isfinite(v))
