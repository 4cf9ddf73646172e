"""The training loop: recipe in, run directory out.

Step events flow one way: loop -> Accumulator (device tensors, no sync) -> one reduced
row per logging interval -> view (live table) and metrics.jsonl. The host waits for the
device only on logging steps.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import recipe as recipes
from ..data import DataError, build_data, iterate_batches, num_batches
from ..files import write_atomic
from ..implicit.cache import FixedPointCache
from ..models import ModelOutput, build_model
from ..tasks import Task, task_for
from . import checkpoint, rundir, usercode
from .checkpoint import CheckpointError, CheckpointWriteError
from .device import autocast, pick_device
from .distributed import (Group, all_ranks, any_rank, average_gradients, barrier, gather,
                          merge_rows, shard, shard_split)
from .evaluate import evaluate
from .memory import PeakMemory
from .metrics import Accumulator, JsonlSink, Sinks, TensorBoardSink, step_stats
from .resume import keep_edited_recipe, set_aside_later, trim_metrics
from .state import (build_optimizer, load_optimizer_state, lr_factor, optimizer_state,
                    rng_state, set_rng_state)


class View(Protocol):
    def log(self, row: dict) -> None: ...
    def event(self, text: str) -> None: ...
    def set_task(self, task: Task) -> None: ...
    def set_total(self, total_steps: int) -> None: ...
    def advance(self, step: int) -> None: ...


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; str() names the steps and the intact checkpoints."""


class Interrupted(RuntimeError):
    """SIGINT (Ctrl-C) or SIGTERM stopped training after a completed step and a checkpoint
    was saved; `code` is the exit status the signal calls for (130 or 143)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.code = 128 + signum


class _EvalStopped(Exception):
    """A signal arrived during an evaluation, which stops at the next batch."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final: dict[str, Any]          # the last evaluation row
    already_finished: bool = False # a resumed run that had nothing left to do


@dataclass
class Progress:
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

    @classmethod
    def from_json(cls, d: Any) -> "Progress":
        """The Progress stored in trainer.json; ValueError naming a malformed field."""
        if not isinstance(d, dict) or set(d) - set(cls.__dataclass_fields__):
            raise ValueError("progress is not a mapping of its fields")
        if "row_start" not in d:      # before rows spanned checkpoints: start afresh
            d = {**d, "row_start": d.get("step"), "row_start_wall": d.get("wall_s")}
        p = cls(**d)
        counts = ("step", "epoch", "pos", "row_start")
        if not all(checkpoint.is_count(getattr(p, k)) for k in counts):
            raise ValueError(f"progress: {', '.join(counts)} must be integers >= 0")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and
                   math.isfinite(v) and v >= 0 for v in (p.wall_s, p.row_start_wall)):
            raise ValueError("progress: times must be finite numbers >= 0")
        if not isinstance(p.eval_pending, bool) or p.row_start > p.step or not (
                p.logged is None or (isinstance(p.logged, list)
                                     and all(isinstance(x, str) for x in p.logged))):
            raise ValueError("progress: eval_pending, logged or row_start is malformed")
        return p


class TrainClock:
    """Training time: wall time since the loop started (plus a resumed run's earlier
    time), evaluations excluded (they are timed in their own rows)."""

    def __init__(self, before: float = 0.0):
        self.before, self.start, self.excluded = before, time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - started

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start - self.excluded


def total_steps(recipe: recipes.Recipe, batches_per_epoch: int) -> int:
    """train.max_steps when set (it wins over epochs), else epochs x batches per epoch."""
    return recipe.train.max_steps or recipe.train.epochs * batches_per_epoch


class _StopOnSignal:
    """SIGINT and SIGTERM ask the loop to stop after the current step (or an evaluation at
    its next batch); a second signal aborts at once, leaving the last complete checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "_StopOnSignal":
        def handler(signum, frame):
            if self.requested:     # abort now: the last complete checkpoint stays
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            self.signum = signum
        try:
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, handler)
        except ValueError:         # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def during_eval(self, done: int, total: int) -> None:
        if self.requested:
            raise _EvalStopped


def objective(task: Task, out: ModelOutput, y: torch.Tensor, jac_weight: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (training loss, task loss): the task loss plus fixed-point corrections and
    Jacobian regularisation, and the task loss alone (what the metrics report)."""
    task_loss = task.loss(out.out, y)
    loss = task_loss
    for weight, earlier in out.corrections:
        loss = loss + weight * task.loss(earlier, y)
    if out.info.jac_loss is not None:
        loss = loss + jac_weight * out.info.jac_loss
    return loss, task_loss


def train(recipe: recipes.Recipe, run_dir: Path, view: View,
          resume: Path | None = None, group: Group = Group()) -> TrainResult:
    """Train per `recipe`, writing recipe.yaml, metrics.jsonl and checkpoints into run_dir.
    Under torchrun, `group` is this process's place: every rank trains on its slice of
    each global batch and rank 0 alone writes (see engine.distributed)."""
    torch.manual_seed(recipe.seed)
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
    if recipe.runtime.deterministic:
        torch.use_deterministic_algorithms(True)
    device, reason = pick_device(recipe.runtime.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())   # this rank's GPU
    view.event(f"device: {device} ({reason})" + (f"; {group.world} processes"
                                                   if group.active else ""))
    data = build_data(recipe.data)
    if data.train is None:
        raise DataError(f"{data.info.name} has no training split")
    for note in data.notes:
        view.event(note)
    info = data.info.as_dict()
    task = task_for(data.info)
    view.set_task(task)
    model = build_model(recipe, data.info).to(device)
    opt = build_optimizer(model.parameters(), recipe.optim)
    nb = num_batches(data.train, recipe.data.batch_size, drop_last=False)
    total = total_steps(recipe, nb)
    view.set_total(total)
    _check_group(group, recipe, len(data.train), len(data.test))
    if recipe.deq.cache_fixed_points:
        model.fixed_point_cache = FixedPointCache(len(data.train))
    if recipe.runtime.compile:
        model.compile_cell()
    scaler = torch.amp.GradScaler(device.type) if recipe.runtime.precision == "fp16" else None
    if recipe.log.tensorboard:
        TensorBoardSink.writer_class()      # a missing package fails before any work
    at, acc = Progress(), Accumulator()
    if resume is not None:
        at, done, pending = _restore(resume, model, opt, device, scaler)
        if at.step >= total and done is not None:      # nothing to do: write nothing
            return TrainResult(run_dir, at.step, done, already_finished=True)
        if len(pending) == group.world:      # the statistics of this rank's pending steps
            acc.rows = pending[group.rank]
        else:                                # another world size: the next row starts afresh
            at.row_start, at.row_start_wall = at.step, at.wall_s
        view.event(f"resumed from {resume} at step {at.step}")
        if group.writer:
            _continue_run(run_dir, checkpoint.resolve(resume), recipe, at, view)
        at.logged = at.logged if at.logged is not None else []

    if group.writer:               # the disk that will hold the checkpoints
        _check_free_space(run_dir, opt, model)
    barrier(group)                 # every rank got this far before rank 0 writes anything
    if group.writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / rundir.RECIPE, recipes.dump(recipe))
        board = [TensorBoardSink(run_dir / "tensorboard", purge_step=at.step + 1 if resume
                                 else None)] if recipe.log.tensorboard else []
        sink = Sinks(JsonlSink(run_dir / rundir.METRICS), *board)
    else:
        sink = Sinks()
    n_params = sum(p.numel() for p in model.parameters())
    view.event(f"{recipe.model.name}: {n_params:,} parameters; {data.info.name}: "
               f"{len(data.train)} train / {len(data.test)} test; {total} steps")

    def save(name: str, final: dict | None = None) -> Path:
        folder = run_dir / "checkpoints" / name
        if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
            raise TrainingDiverged(f"weights became non-finite by step {at.step}; not saved; "
                                   + _diverged_message(last_ok, at.step, run_dir))
        pending = gather(group, acc.snapshot())    # every rank's steps since the last row
        if not group.writer:       # rank 0 saves; the others wait so none exits early
            barrier(group)
            return folder
        at.wall_s = clock.elapsed()
        at.row_start, at.row_start_wall = last_ok, last_wall
        tensors, opt_json = optimizer_state(opt)
        cache = model.fixed_point_cache.tensors() if model.fixed_point_cache else {}
        trainer = {"tensors": {**tensors, **rng_state(), **cache},
                   "json": {"progress": asdict(at), "optimizer": opt_json,
                            "pending_rows": pending,
                            "scaler": scaler.state_dict() if scaler else None,
                            "deq": {"step": model.deq.step, "last_nfe": model.deq._last_nfe}}}
        checkpoint.save(folder, model, recipe, info,
                        {"step": at.step, "epoch": at.step / nb, "metrics": final,
                         "code": usercode.records(recipe.user_code())}, trainer)
        view.event(f"saved checkpoint {folder}")
        barrier(group)
        return folder

    def run_eval() -> dict[str, Any]:
        with clock.paused(), memory.paused():
            # Under torchrun an evaluation is never cut short: ranks must meet in its merge.
            row = evaluate(model, task, test_part, recipe.data.eval_batch_size, device=device,
                           precision=recipe.runtime.precision,
                           on_batch=None if group.active else stop.during_eval,
                           merge=lambda r: merge_rows(group, r))
        row = {"step": at.step, "epoch": at.step / nb, **row, "wall_s": clock.elapsed(),
               "peak_mem_mb": memory.peak_mb()}
        sink.write(row)
        at.logged.append(row["split"])
        view.log(row)
        return row

    def log_train_row(lr: float) -> None:
        """Write the row of the steps since the last one (a sync point); stop on divergence."""
        nonlocal last_wall, last_ok
        row = task.finish(merge_rows(group, acc.reduce()))
        now = clock.elapsed()
        row = {"step": at.step, "epoch": at.step / nb, "split": "train", "lr": lr, **row,
               "step_time_s": (now - last_wall) / (at.step - last_ok),
               "samples_per_s": row["n"] / (now - last_wall), "wall_s": now,
               "peak_mem_mb": memory.peak_mb()}
        sink.write(row)
        at.logged.append("train")
        view.log(row)
        if not math.isfinite(row["loss"]) or row["skipped_steps"]:
            raise TrainingDiverged(_diverged_message(last_ok, at.step, run_dir))
        last_wall, last_ok = clock.elapsed(), at.step

    amp = autocast(device, recipe.runtime.precision)
    memory, clock = PeakMemory(device), TrainClock(at.wall_s)
    test_part = shard_split(group, data.test)
    last_ok, last_wall = (at.row_start, at.row_start_wall) if resume is not None else (0, 0.0)
    jac_weight = recipe.deq.jacobian_reg.weight
    augment = getattr(recipe.data, "augment", False)   # only image-like sources have the key
    model.train()
    with _StopOnSignal() as stop:
        if at.eval_pending and at.step < total:     # cut short before the interruption
            run_eval()
            at.eval_pending = False
        while at.step < total:
            batches = iterate_batches(data.train, recipe.data.batch_size, shuffle=True,
                                      seed=recipe.seed, epoch=at.epoch, start=at.pos,
                                      augment=augment, device=device, with_index=True)
            for x, y, index in batches:
                if group.active:   # this rank's slice; randomness a function of (step, rank)
                    part, size = shard(group, len(x)), len(x)
                    x, y, index, share = x[part], y[part], index[part], len(x[part]) / size
                    torch.manual_seed(hash((recipe.seed, at.step, group.rank)) % 2**63)
                lr = recipe.optim.lr * lr_factor(at.step, total, recipe.schedule)
                for param_group in opt.param_groups:
                    param_group["lr"] = lr
                with amp:
                    out = model.run(x, index=index)
                    loss, task_loss = objective(task, out, y, jac_weight)
                opt.zero_grad(set_to_none=True)
                (scaler.scale(loss) if scaler else loss).backward()
                if group.active:
                    average_gradients(group, model, share)
                if scaler:    # fp16: overflowing gradients are the scaler's business
                    scaler.unscale_(opt)
                finite = _drop_nonfinite_grads(model, loss, grads=scaler is None,
                                               agree=lambda flag: all_ranks(group, flag))
                if recipe.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                with torch.no_grad():
                    acc.add({**step_stats(out, task_loss, task.stats(out.out, x, y)),
                             "skipped_steps": (~finite).int()})
                at.step, at.pos, at.logged = at.step + 1, at.pos + 1, []
                epoch_done = at.pos == nb
                if epoch_done:
                    at.epoch, at.pos = at.epoch + 1, 0
                view.advance(at.step)

                stopping = any_rank(group, stop.requested, device)
                if at.step % recipe.train.log_every == 0 or at.step == total or stopping:
                    log_train_row(lr)
                every = recipe.train.eval_every
                evaluate_now = at.step < total and (
                    (epoch_done and recipe.train.eval_every_epoch)
                    or (every and at.step % every == 0))
                save_now = recipe.train.save_every and at.step % recipe.train.save_every == 0
                if evaluate_now:
                    try:
                        run_eval()
                    except _EvalStopped:                 # handled below; redone on resume
                        at.eval_pending = True
                if save_now:
                    save(f"step-{at.step:06d}")
                if not stopping and (evaluate_now or save_now):
                    # a signal may have come during them: stop at this step all the same
                    stopping = any_rank(group, stop.requested, device)
                    if stopping and last_ok < at.step:
                        log_train_row(lr)
                if stopping:
                    folder = save("interrupted")
                    raise Interrupted(f"interrupted at step {at.step}; checkpoint saved to "
                                      f"{folder}; resume with: deqctl train --resume {folder}",
                                      stop.signum or signal.SIGTERM)
                if at.step >= total or epoch_done:
                    break
        # The trained weights first, so that a signal during the final evaluation still
        # leaves a finished run; resuming it runs only the evaluation.
        folder = save("final")
        try:
            final = run_eval()
        except _EvalStopped:
            raise Interrupted(f"interrupted during the final evaluation; the trained model is "
                              f"saved in {folder}; evaluate it with: deqctl train --resume "
                              f"{folder}", stop.signum) from None
        save("final", final)
    return TrainResult(run_dir, at.step, final)


def _drop_nonfinite_grads(model: torch.nn.Module, loss: torch.Tensor, grads: bool = True,
                          agree=lambda flag: flag) -> torch.Tensor:
    """Zero the gradients of a step whose total loss (or, with `grads`, gradients) is not
    finite, without a host sync (`agree` makes the ranks of torchrun decide as one), so NaN
    never reaches the weights; return the device flag (True: finite) that the next logging
    step reads to report the step and stop."""
    finite = torch.isfinite(loss.detach())
    grads = [p.grad for p in model.parameters() if p.grad is not None] if grads else []
    if grads:
        finite = finite & torch.isfinite(torch.stack([g.norm() for g in grads]).sum())
    finite = agree(finite)
    for p in model.parameters():
        if p.grad is not None:
            p.grad = torch.where(finite, p.grad, torch.zeros_like(p.grad))
    return finite


def _check_group(group: Group, recipe: recipes.Recipe, n_train: int, n_test: int) -> None:
    """What data-parallel training needs: every rank gets part of every batch."""
    if not group.active:
        return
    b, w = recipe.data.batch_size, group.world
    if b < w or 0 < n_train % b < w:
        raise recipes.RecipeError(f"data.batch_size={b} (the global batch) leaves a rank of "
                                  f"{w} without samples in some batch; use a multiple of {w}")
    if n_test < w:
        raise recipes.RecipeError(f"the test split has {n_test} samples, fewer than the {w} "
                                  f"processes that share its evaluation")
    if recipe.deq.cache_fixed_points:
        raise recipes.RecipeError("deq.cache_fixed_points works in one process only for now")


def _check_free_space(run_dir: Path, opt: torch.optim.Optimizer, model) -> None:
    """Refuse to start when the disk cannot hold two checkpoints (a save writes the new one
    before it drops the old): better now than after hours of training."""
    tensors = [p for p in model.parameters()] + [v for st in opt.state.values()
                                                 for v in st.values() if torch.is_tensor(v)]
    per_param = 3 if not opt.state else 1      # Adam's two moments arrive after step 1
    need = sum(t.numel() * t.element_size() for t in tensors) * per_param
    if model.fixed_point_cache is not None:
        need += model.fixed_point_cache.size * 4 * 64     # a rough floor; grows with the state
    where = next(p for p in [run_dir, *run_dir.resolve().parents] if p.exists())
    free = shutil.disk_usage(where).free
    if free < 2 * need + 2**20:
        raise CheckpointWriteError(f"only {free / 2**20:.0f} MB free at {where}; two "
                                   f"checkpoints of this run need about {2 * need / 2**20:.0f} MB")


def _diverged_message(last_ok: int, step: int, run_dir: Path) -> str:
    ckpts = [c.name for c in checkpoint.checkpoints(run_dir)]
    kept = f"checkpoints kept: {', '.join(ckpts)}" if ckpts else "no checkpoint was written yet"
    return (f"loss became non-finite between steps {last_ok + 1} and {step}; {kept}; "
            f"try a lower optim.lr, deq.jacobian_reg.weight > 0 or model.init_std=0.01")


def _restore(path: Path, model, opt, device, scaler
             ) -> tuple[Progress, dict | None, list[list[dict[str, float]]]]:
    """Load a checkpoint's weights and trainer state; returns (progress, the final
    evaluation row if the checkpoint is a finished run's, the statistics of the steps
    since the last train row, one list per rank)."""
    folder = checkpoint.resolve(path)
    meta = checkpoint.load_weights(folder, model, device)
    tensors, trainer = checkpoint.load_trainer(folder)
    # Everything below comes from files a user may have edited or been sent: any wrong
    # type or count is one line, never a traceback.
    try:
        progress = Progress.from_json(trainer["progress"])
        pending = trainer.get("pending_rows", [])
        if not (isinstance(pending, list) and all(isinstance(rank, list) and all(
                isinstance(r, dict) and all(isinstance(v, (int, float)) for v in r.values())
                for r in rank) for rank in pending)):
            raise ValueError("pending_rows is malformed")
        deq_step, last_nfe = trainer["deq"]["step"], trainer["deq"]["last_nfe"]
        if not checkpoint.is_count(deq_step) or not (last_nfe is None or
                                                      checkpoint.is_count(last_nfe)):
            raise ValueError("deq.step / deq.last_nfe must be integers >= 0")
        load_optimizer_state(opt, {k: v.to(device) for k, v in tensors.items()
                                   if k.startswith("optim.")}, trainer["optimizer"])
        set_rng_state(tensors)
        if model.fixed_point_cache is not None:
            model.fixed_point_cache.load({k: v.to(device) for k, v in tensors.items()})
        model.deq.step, model.deq._last_nfe = deq_step, last_nfe
        if scaler is not None and trainer.get("scaler"):
            scaler.load_state_dict(trainer["scaler"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: trainer state is malformed "
                              f"({type(exc).__name__}: {str(exc)[:80]}); cannot resume") from None
    return progress, meta.get("metrics"), pending


def _continue_run(run_dir: Path, folder: Path, recipe: recipes.Recipe, at: Progress,
                  view: View) -> None:
    """Make a run's files what the checkpoint resumed from knows, in an order a crash at
    any point leaves resumable: later checkpoints are set aside before the rows they
    account for are dropped (so the next `--resume RUN` finds this checkpoint), and a
    hand-edited recipe is kept under a new name before recipe.yaml is rewritten."""
    later = set_aside_later(run_dir, at.step)
    if later:
        view.event(f"checkpoints of later steps set aside: {', '.join(later)}")
    dropped = trim_metrics(run_dir / rundir.METRICS, at.step, at.logged, warn=view.event)
    if dropped:
        view.event(f"dropped {dropped} metrics rows logged after the checkpoint resumed "
                   f"from (step {at.step})")
    edited = keep_edited_recipe(run_dir, folder, recipe)
    if edited:
        view.event(f"warning: {edited}")
