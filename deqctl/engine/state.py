"""Trainer state: where training stands (TrainerState), and everything a checkpoint holds
to continue bit-exactly (optimizer, RNG, gradient scaler, fixed-point cache) as a
(tensors, JSON) pair: nothing is ever pickled."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..recipe import ScheduleSettings


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62


def _time(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


@dataclass
class TrainerState:
    """Where training stands; saved in every checkpoint so a resume is bit-exact."""

    step: int = 0
    epoch: int = 0                 # epochs completed
    pos: int = 0                   # batches done in the current epoch
    wall_s: float = 0.0            # training time so far, evaluations excluded
    eval_pending: bool = False     # a signal cut this step's evaluation short: redo it
    # The metrics rows of this step already written (splits): a resume keeps exactly
    # these and the rows of earlier steps. None (checkpoints before this field): all.
    logged: list[str] | None = field(default_factory=list)
    row_start: int = 0             # the step the next train row's interval starts after
    row_start_wall: float = 0.0    # ... and the training time then
    # every rank's statistics of the steps since the last train row (host numbers)
    pending: list[list[dict[str, float]]] = field(default_factory=list)
    deq_step: int = 0              # the DEQ layer's training calls (Jacobian-reg cadence)
    deq_last_nfe: int | None = None
    # every rank's last step losses before the next train row (the loss-spike detector's
    # window): empty in checkpoints before it, which start the window afresh
    recent_losses: list[list[float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "TrainerState":
        """The state stored in trainer.json (this version's, or the earlier layout of
        "progress", "deq" and "pending_rows"); ValueError naming a malformed field."""
        if isinstance(d, dict) and isinstance(d.get("progress"), dict):    # earlier layout
            deq = d.get("deq") if isinstance(d.get("deq"), dict) else {}
            d = {**d["progress"], "pending": d.get("pending_rows", []),
                 "deq_step": deq.get("step"), "deq_last_nfe": deq.get("last_nfe")}
        if not isinstance(d, dict) or set(d) - {f.name for f in fields(cls)}:
            raise ValueError("the trainer state is not a mapping of its fields")
        if "row_start" not in d:      # before rows spanned checkpoints: start afresh
            d = {**d, "row_start": d.get("step"), "row_start_wall": d.get("wall_s")}
        s = cls(**d)
        checks = {"step, epoch, pos, row_start and deq_step must be integers >= 0":
                  all(_count(v) for v in (s.step, s.epoch, s.pos, s.row_start, s.deq_step)),
                  "times must be finite numbers >= 0": _time(s.wall_s) and _time(s.row_start_wall),
                  "eval_pending must be true or false": isinstance(s.eval_pending, bool),
                  "row_start is after step": s.row_start <= s.step,
                  "logged must be a list of splits": s.logged is None or (
                      isinstance(s.logged, list) and all(isinstance(x, str) for x in s.logged)),
                  "deq_last_nfe must be an integer >= 0 or null":
                      s.deq_last_nfe is None or _count(s.deq_last_nfe),
                  "logged holds splits (train, val, test)": s.logged is None or set(s.logged)
                      <= {"train", "val", "test"},
                  "pending must be lists of rows of numbers, each with its n": isinstance(
                      s.pending, list) and all(isinstance(rank, list) and all(
                          isinstance(r, dict) and _count(r.get("n")) and all(
                              # NaN: a value the step has not (an explicit mode's adjoint
                              # residual), as in its metrics row
                              isinstance(v, (int, float)) and not math.isinf(v)
                              for v in r.values()) for r in rank)
                      for rank in s.pending),
                  "recent_losses must be lists of at most 50 finite numbers": isinstance(
                      s.recent_losses, list) and all(isinstance(rank, list) and len(rank) <= 50
                      and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                              and math.isfinite(v) for v in rank)
                      for rank in s.recent_losses)}
        bad = [what for what, ok in checks.items() if not ok]
        if bad:
            raise ValueError("; ".join(bad))
        return s


def check_optimizer(opt: torch.optim.Optimizer, fresh: list[dict[str, Any]]) -> None:
    """ValueError unless a loaded optimizer state could have been saved by this recipe's
    optimizer: each group's settings of the types (and tuple lengths) a fresh one has,
    numbers finite, flags unchanged; each parameter's state tensors finite and shaped like
    it (a wrong one would fail, or corrupt the weights, only at the next step)."""
    if len(opt.param_groups) != len(fresh):
        raise ValueError("optimizer param_groups do not match the model")
    for group, ref in zip(opt.param_groups, fresh):
        for key, want in ref.items():
            got = group.get(key)
            if isinstance(want, bool) or want is None:
                ok = got == want                     # flags: never changed by a run
            elif isinstance(want, (int, float)):
                ok = isinstance(got, (int, float)) and not isinstance(got, bool) \
                    and math.isfinite(got)
            elif isinstance(want, tuple):
                ok = isinstance(got, tuple) and len(got) == len(want) and all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in got)
            else:
                ok = type(got) is type(want)
            if not ok:
                raise ValueError(f"optimizer setting {key} is {str(got)[:40]}")
    for p, st in opt.state.items():
        for key, value in st.items():
            if not torch.is_tensor(value):
                continue
            if value.dim() and value.shape != p.shape:
                raise ValueError(f"optimizer state {key} is shaped {tuple(value.shape)}, its "
                                 f"parameter {tuple(p.shape)}")
            if value.is_complex() or not bool(torch.isfinite(value).all()) or (
                    key == "step" and float(value) < 0):
                raise ValueError(f"optimizer state {key} holds NaN, inf or a negative step")


def trainer_payload(state: TrainerState, opt: torch.optim.Optimizer, scaler, cache,
                    warm: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a training checkpoint stores besides the weights: {"tensors", "json"};
    `warm` is the model's warm-start state (DEQModel.warm_tensors)."""
    tensors, opt_json = optimizer_state(opt)
    return {"tensors": {**tensors, **rng_state(), **(cache.tensors() if cache else {}), **warm},
            "json": {"state": state.to_json(), "optimizer": opt_json,
                     "scaler": scaler.state_dict() if scaler else None}}


def restore_trainer(tensors: dict[str, torch.Tensor], scalars: dict[str, Any],
                    opt: torch.optim.Optimizer, scaler, cache, device) -> TrainerState:
    """Put a checkpoint's optimizer, RNG, scaler and cache state back; returns where
    training stood. Any malformed field (the files may have been edited or sent by
    anyone) raises one of KeyError, TypeError, ValueError, IndexError or RuntimeError."""
    state = TrainerState.from_json(scalars.get("state", scalars))
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    load_optimizer_state(opt, {k: v.to(device) for k, v in tensors.items()
                               if k.startswith("optim.")}, scalars["optimizer"])
    check_optimizer(opt, fresh)
    set_rng_state(tensors)
    if cache is not None:
        cache.load({k: v.to(device) for k, v in tensors.items()})
    if scaler is not None and scalars.get("scaler"):
        scaler.load_state_dict(scalars["scaler"])
    return state


def lr_factor(step: int, total: int, cfg: ScheduleSettings) -> float:
    """Multiplier of the base learning rate at `step`: linear warmup, then cosine or flat."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into tensors and JSON-able scalars."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{key}"] = val
            else:
                scalars[f"{pid}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    """Inverse of `optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = val
    for name, val in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, torch.Tensor]:
    """The global RNG states that dropout and Hutchinson probes draw from."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
