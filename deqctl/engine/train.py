"""The training loop: recipe in, run directory out, as a Trainer whose phases are methods.

    result = Trainer(recipe, run_dir, view).run()       # or resume=checkpoint folder

Step events flow one way: step -> Accumulator (device tensors, no sync) -> one reduced row
per logging interval -> view (live table) and metrics.jsonl. The host waits for the
device only on logging steps. `callbacks` are the public seam into the loop: objects with
any of `on_step_end(trainer)` and `on_eval_batch(trainer, done, total)`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import recipe as recipes
from ..data import DataBundle, DataError, Split, build_data, iterate_batches, num_batches
from ..files import write_atomic
from ..implicit.cache import FixedPointCache
from ..keys import K
from ..models import DEQModel, ModelOutput, build_model
from ..tasks import Task, task_for
from . import checkpoint, rundir, trackers, usercode
from .checkpoint import CheckpointError, CheckpointWriteError
from .device import autocast, budget_threads, pick_device
from .distributed import (Group, all_ranks, any_rank, average_gradients, barrier, gather,
                          merge_rows, shard_split)
from .evaluate import evaluate
from .memory import PeakMemory
from .metrics import Accumulator, JsonlSink, step_stats, with_stop_reason
from .optim import build_optimizer
from .resume import continue_run
from .signals import EvalStopped, StopOnSignal
from .stability import LossSpikes
from .state import TrainerState, lr_factor, restore_trainer, trainer_payload
from .trackers import Trackers


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


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final: dict[str, Any]          # the last evaluation row
    already_finished: bool = False # a resumed run that had nothing left to do


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


class Trainer:
    """One run's training. Under torchrun, `group` is this process's place: every rank
    trains on its slice of each global batch and rank 0 alone writes."""

    def __init__(self, recipe: recipes.Recipe, run_dir: Path, view: View,
                 resume: Path | None = None, group: Group = Group(), callbacks: tuple = ()):
        self.recipe, self.run_dir, self.view, self.resume = recipe, Path(run_dir), view, resume
        self.group, self.callbacks = group, tuple(callbacks)
        self.state, self.acc = TrainerState(), Accumulator()
        self.spikes = LossSpikes()
        # made by setup(), before any file is touched
        self.device: torch.device | None = None
        self.data: DataBundle | None = None
        self.task: Task | None = None
        self.model: DEQModel | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None       # fp16 only
        self.amp: contextlib.AbstractContextManager | None = None
        self.batches_per_epoch = self.total = 0
        self.test_part: Split | None = None                   # this rank's test samples
        # made by open_run(), once the run folder is held
        self.metrics: JsonlSink | None = None                 # rank 0 alone writes
        self.trackers: Trackers | None = None
        self.memory: PeakMemory | None = None
        self.clock: TrainClock | None = None
        self.last_ok, self.last_wall = 0, 0.0                 # where the current row began
        # while training
        self.stop: StopOnSignal | None = None
        self.lr = recipe.optim.lr

    # -- the phases ---------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to the recipe's last step (from `resume` when given) and evaluate."""
        self.setup()
        if self.resume is not None:
            finished = self.restore()
            if finished is not None:          # nothing to do: write nothing
                return TrainResult(self.run_dir, self.state.step, finished, True)
        self.open_run()
        status = "failed"
        try:
            with StopOnSignal() as self.stop:
                if self.state.eval_pending and self.state.step < self.total:
                    self.evaluate()                # cut short before the interruption
                    self.state.eval_pending = False
                while self.state.step < self.total:
                    self.epoch()
                result = self.finish()
            status = "finished"
            return result
        except Interrupted:
            status = "interrupted"
            raise
        finally:
            if self.trackers is not None:
                self.trackers.close(status)

    def setup(self) -> None:
        """Device, data, task, model, optimizer: everything before any file is touched."""
        r, group = self.recipe, self.group
        torch.manual_seed(r.seed)
        device, reason = pick_device(r.runtime.device)
        threads = budget_threads(r.runtime.threads, getattr(r.data, "workers", 0), device)
        if r.runtime.deterministic:
            torch.use_deterministic_algorithms(True)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())   # this rank's GPU
        self.device = device
        self.view.event(f"device: {device} ({reason}; {threads})" + (f"; {group.world} processes"
                                                           if group.active else ""))
        self.data = build_data(r.data)
        if self.data.train is None:
            raise DataError(f"{self.data.info.name} has no training split")
        for note in self.data.notes:
            self.view.event(note)
        self.task = task_for(self.data.info)
        self.view.set_task(self.task)
        self.model = build_model(r, self.data.info).to(device)
        self.model.deq.seed = r.seed         # deq.mode=recurrent draws depths from (seed, step)
        self.opt = build_optimizer(self.model.parameters(), r.optim)
        self.batches_per_epoch = num_batches(self.data.train, r.data.batch_size, drop_last=False)
        self.total = total_steps(r, self.batches_per_epoch)
        self.view.set_total(self.total)
        _check_group(group, r, len(self.data.train), len(self.data.test))
        if r.deq.cache_fixed_points:
            self.model.fixed_point_cache = FixedPointCache(len(self.data.train))
        if r.runtime.compile:
            self.model.compile_cell()
        self.scaler = torch.amp.GradScaler(device.type) if r.runtime.precision == "fp16" else None
        trackers.check(r.log)                # a missing package fails before any work
        self.amp = autocast(device, r.runtime.precision)
        self.test_part = shard_split(group, self.data.test)

    def restore(self) -> dict | None:
        """Load the checkpoint resumed from and bring the run's files in line with it;
        returns its final evaluation row when the run had already finished."""
        folder = checkpoint.resolve(self.resume)
        meta = checkpoint.load_weights(folder, self.model, self.device)
        tensors, scalars = checkpoint.load_trainer(folder)
        try:     # the files may have been edited or sent by anyone: one line, no traceback
            self.state = restore_trainer(tensors, scalars, self.opt, self.scaler,
                                         self.model.fixed_point_cache, self.device)
            self.model.load_warm({k: v.to(self.device) for k, v in tensors.items()})
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError,
                AssertionError) as exc:
            why = str(exc).splitlines()[0][:80] if str(exc) else ""
            raise CheckpointError(f"{folder}: trainer state is malformed ({type(exc).__name__}"
                                  f"{': ' + why if why and '<' not in why else ''}); cannot "
                                  f"resume") from None
        s = self.state
        self._check_restored(folder, meta)
        self.model.deq.step, self.model.deq.last_nfe = s.deq_step, s.deq_last_nfe
        if s.step >= self.total and meta.get("metrics") is not None:
            return meta["metrics"]
        if len(s.pending) == self.group.world:    # this rank's steps since the last row
            self.acc.rows = s.pending[self.group.rank]
        if len(s.recent_losses) == self.group.world:
            self.spikes = LossSpikes(s.recent_losses[self.group.rank])
        else:                                     # another world size: the row starts afresh
            s.row_start, s.row_start_wall = s.step, s.wall_s
        self.view.event(f"resumed from {self.resume} at step {s.step}")
        if self.group.writer:
            continue_run(self.run_dir, folder, self.recipe, s, self.view)
        s.logged = s.logged if s.logged is not None else []
        return None

    def _check_restored(self, folder: Path, meta: dict[str, Any]) -> None:
        """CheckpointError unless the trainer state agrees with the checkpoint it came in
        and with the data: a state edited to an earlier step would otherwise set aside the
        checkpoint itself and drop the run's rows."""
        s, nb = self.state, self.batches_per_epoch
        problems = []
        if s.step != meta.get("step"):
            problems.append(f"its step {s.step} is not the checkpoint's ({meta.get('step')})")
        if not (s.pos < nb and s.step == s.epoch * nb + s.pos):
            problems.append(f"epoch {s.epoch} and batch {s.pos} are not step {s.step} at "
                            f"{nb} batches per epoch")
        if s.step >= self.total and s.logged is not None and \
                (meta.get("metrics") is None) == ("test" in s.logged):
            problems.append("its final evaluation is recorded in one file and not the other")
        if problems:
            raise CheckpointError(f"{folder}: trainer state is inconsistent: "
                                  f"{'; '.join(problems)}; cannot resume")

    def open_run(self) -> None:
        """Check the disk, write the resolved recipe and open the metrics sinks."""
        r, group = self.recipe, self.group
        if group.writer:               # the disk that will hold the checkpoints
            _check_free_space(self.run_dir, self.opt, self.model)
        barrier(group)                 # every rank got this far before rank 0 writes anything
        if group.writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # trackers first: a store that refuses leaves the new folder as it was
            self.trackers = Trackers(r.log, self.run_dir, r.model_dump(mode="json"),
                                     self.state.step if self.resume else None, self.view.event)
            write_atomic(self.run_dir / rundir.RECIPE, recipes.dump(r))
            self.metrics = JsonlSink(self.run_dir / rundir.METRICS)
        self.memory, self.clock = PeakMemory(self.device), TrainClock(self.state.wall_s)
        self.last_ok, self.last_wall = self.state.row_start, self.state.row_start_wall
        n_params = sum(p.numel() for p in self.model.parameters())
        name = f"baseline {type(self.model).__name__}" if r.deq.mode == "baseline" \
            else r.model.name
        self.view.event(f"{name}: {n_params:,} parameters; {self.data.info.name}: "
                        f"{len(self.data.train)} train / {len(self.data.test)} test; "
                        f"{self.total} steps")
        if self.model.deq.pretraining_left:
            last = min(r.deq.pretrain_steps, self.total)
            self.view.event(f"shallow pretraining: steps {self.state.step + 1} to {last} "
                            f"train the cell unrolled (depth {r.deq.explicit_depth})" +
                            (", then implicitly" if last < self.total else
                             ": every step of this run"))
        self.model.train()

    def epoch(self) -> None:
        """The rest of the current epoch (or of training), step by step."""
        s, r = self.state, self.recipe
        # each rank reads (and decodes) only its slice of every global batch
        batches = iter(iterate_batches(self.data.train, r.data.batch_size, shuffle=True,
                                       seed=r.seed, epoch=s.epoch, start=s.pos,
                                       augment=getattr(r.data, "augment", False),
                                       device=self.device, with_index=True,
                                       shard=(self.group.rank, self.group.world)))
        while True:
            try:
                x, y, index = next(batches)
            except StopIteration:
                return
            except DataError as exc:         # an image that cannot be decoded, a dead worker
                raise DataError(self.data_failed(exc)) from None
            self.step(x, y, index)
            epoch_done = s.pos == 0
            for cb in self.callbacks:
                getattr(cb, "on_step_end", lambda t: None)(self)
            self.cadence(epoch_done)
            if s.step >= self.total or epoch_done:
                return

    def data_failed(self, exc: DataError) -> str:
        """The one line of a batch that could not be read: after the `interrupted`
        checkpoint of the steps done (one process; under torchrun the other ranks are
        stopped by torchrun, so no rank could meet in a save)."""
        s = self.state
        if self.group.active or s.step == 0:
            return str(exc)
        folder = self.save("interrupted")
        return (f"{exc}; checkpoint saved to {folder}; once the file is replaced, resume "
                f"with: deqctl train --resume {folder}")

    def step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        """One optimizer step: forward solve, implicit backward, update, statistics."""
        s, r, group = self.state, self.recipe, self.group
        share = 1.0
        if group.active:   # x is this rank's slice; randomness a function of (step, rank)
            size = min(r.data.batch_size, len(self.data.train) - s.pos * r.data.batch_size)
            share = len(x) / size
            torch.manual_seed(hash((r.seed, s.step, group.rank)) % 2**63)
        self.lr = r.optim.lr * lr_factor(s.step, self.total, r.schedule)
        for param_group in self.opt.param_groups:
            param_group["lr"] = self.lr
        if r.deq.pretrain_steps and self.model.deq.step == r.deq.pretrain_steps:
            self.view.event(f"step {s.step + 1}: shallow pretraining done; training "
                            f"implicitly from here")
        with self.amp:
            out = self.model.run(x, index=index)
            loss, task_loss = self.objective(out, y)
        self.opt.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if group.active:
            average_gradients(group, self.model, share)
        if self.scaler:    # fp16: overflowing gradients are the scaler's business
            self.scaler.unscale_(self.opt)
        finite, grad_norm = self.check_gradients(loss)
        if r.optim.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), r.optim.grad_clip,
                                                 grad_norm)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        with torch.no_grad():
            self.acc.add({**step_stats(out, task_loss, self.task.stats(out.out, x, y)),
                          K.skipped_steps: (~finite).int(), K.grad_norm: grad_norm})
        s.step, s.pos, s.logged = s.step + 1, s.pos + 1, []
        if s.pos == self.batches_per_epoch:
            s.epoch, s.pos = s.epoch + 1, 0
        self.view.advance(s.step)

    def objective(self, out: ModelOutput, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, task loss): the task loss plus fixed-point corrections and
        Jacobian regularisation, and the task loss alone (what the metrics report)."""
        task_loss = self.task.loss(out.out, y)
        loss = task_loss
        for weight, earlier in out.corrections:
            loss = loss + weight * self.task.loss(earlier, y)
        if out.info.jac_loss is not None:
            loss = loss + self.recipe.deq.jacobian_reg.weight * out.info.jac_loss
        return loss, task_loss

    def check_gradients(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(finite, gradient norm) of this step without a host sync: a step whose total loss
        (or, without a scaler, gradient) is not finite has its gradients zeroed, with the
        ranks of torchrun deciding as one, so NaN never reaches the weights; the flag is
        read at the next logging step, which reports the step and stops."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
        finite = torch.isfinite(loss.detach())
        if self.scaler is None:
            finite = finite & torch.isfinite(norm)
        finite = all_ranks(self.group, finite)
        for g in grads:
            g.copy_(torch.where(finite, g, torch.zeros_like(g)))
        # the norm clipping divides by: that of the zeroed gradients on a dropped step
        return finite, torch.where(finite, norm, torch.zeros_like(norm)).detach()

    def cadence(self, epoch_done: bool) -> None:
        """After a step: the train row, evaluation and checkpoint due now, and the stop a
        signal asked for (with its `interrupted` checkpoint)."""
        s, t, group = self.state, self.recipe.train, self.group
        stopping = any_rank(group, self.stop.requested, self.device)
        # A stop logs no row of its own: the steps since the last row go into the
        # `interrupted` checkpoint, and the resumed run's next row covers them, so an
        # interrupted run's rows are those of a run never stopped.
        if s.step % t.log_every == 0 or s.step == self.total:
            self.log_train_row()
        evaluate_now = s.step < self.total and ((epoch_done and t.eval_every_epoch)
                                                or (t.eval_every and s.step % t.eval_every == 0))
        save_now = t.save_every and s.step % t.save_every == 0
        if evaluate_now:
            try:
                self.evaluate()
            except EvalStopped:                 # handled below; redone on resume
                s.eval_pending = True
        if save_now:
            self.save(f"step-{s.step:06d}")
        if not stopping and (evaluate_now or save_now):
            # a signal may have come during them: stop at this step all the same
            stopping = any_rank(group, self.stop.requested, self.device)
        if stopping:
            folder = self.save("interrupted")
            raise Interrupted(f"interrupted at step {s.step}; checkpoint saved to {folder}; "
                              f"resume with: deqctl train --resume {folder}",
                              self.stop.signum or signal.SIGTERM)

    def finish(self) -> TrainResult:
        """Save the trained weights, then evaluate, then save again with the result: a
        signal during the final evaluation still leaves a finished run, and resuming it
        runs only the evaluation."""
        folder = self.save("final")
        try:
            final = self.evaluate()
        except EvalStopped:
            raise Interrupted(f"interrupted during the final evaluation; the trained model is "
                              f"saved in {folder}; evaluate it with: deqctl train --resume "
                              f"{folder}", self.stop.signum) from None
        self.save("final", final)
        return TrainResult(self.run_dir, self.state.step, final)

    # -- rows and checkpoints -------------------------------------------------------------

    def write(self, row: dict[str, Any]) -> None:
        """A metrics row to metrics.jsonl, then to the trackers (rank 0 alone writes)."""
        if self.metrics is not None:
            self.metrics.write(row)
            self.trackers.write(row)

    def log_train_row(self) -> None:
        """Write the row of the steps since the last one (a sync point); stop on divergence."""
        s = self.state
        local = self.acc.reduce()
        local[K.loss_spikes] = self.spikes.count(self.acc.step_losses)
        row = self.task.finish(with_stop_reason(merge_rows(self.group, local)),
                               self.data.train)
        now = self.clock.elapsed()
        row = {K.step: s.step, K.epoch: s.step / self.batches_per_epoch, K.split: "train",
               K.lr: self.lr, **row,
               K.step_time_s: (now - self.last_wall) / (s.step - self.last_ok),
               K.samples_per_s: row[K.n] / (now - self.last_wall), K.wall_s: now,
               K.peak_mem_mb: self.memory.peak_mb()}
        self.write(row)
        s.logged.append("train")
        self.view.log(row)
        if not math.isfinite(row[K.loss]) or row[K.skipped_steps]:
            raise TrainingDiverged(_diverged_message(self.last_ok, s.step, self.run_dir))
        self.last_wall, self.last_ok = self.clock.elapsed(), s.step

    def evaluate(self) -> dict[str, Any]:
        """Evaluate on the test split and write its row (evaluation time excluded from the
        training clock and the peak memory)."""
        s, group = self.state, self.group

        def on_batch(done: int, total: int) -> None:
            for cb in self.callbacks:
                getattr(cb, "on_eval_batch", lambda t, d, n: None)(self, done, total)
            self.stop.check()
        with self.clock.paused(), self.memory.paused():
            # Under torchrun an evaluation is never cut short: ranks must meet in its merge.
            row = evaluate(self.model, self.task, self.test_part, self.recipe.data.eval_batch_size,
                           device=self.device, precision=self.recipe.runtime.precision,
                           on_batch=None if group.active else on_batch,
                           merge=lambda r: merge_rows(group, r))
        row = {K.step: s.step, K.epoch: s.step / self.batches_per_epoch, **row,
               K.wall_s: self.clock.elapsed(), K.peak_mem_mb: self.memory.peak_mb()}
        self.write(row)
        s.logged.append(row[K.split])
        self.view.log(row)
        return row

    def save(self, name: str, final: dict | None = None) -> Path:
        """Write checkpoint `name` (rank 0; the others wait): weights, recipe, meta and the
        trainer state, with the steps since the last train row."""
        s, group = self.state, self.group
        folder = self.run_dir / rundir.CHECKPOINTS / name
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            raise TrainingDiverged(f"weights became non-finite by step {s.step}; not saved; "
                                   f"{_kept(self.run_dir)}; {ADVICE}")
        s.pending = gather(group, self.acc.snapshot())   # every rank's steps since the last row
        s.recent_losses = gather(group, list(self.spikes.history))
        if not group.writer:
            barrier(group)
            return folder
        s.wall_s = self.clock.elapsed()
        s.row_start, s.row_start_wall = self.last_ok, self.last_wall
        s.deq_step, s.deq_last_nfe = self.model.deq.step, self.model.deq.last_nfe
        meta = {"step": s.step, "epoch": s.step / self.batches_per_epoch, "metrics": final,
                "code": usercode.records(self.recipe.user_code())}
        checkpoint.save(folder, self.model, self.recipe, self.data.info.as_dict(), meta,
                        trainer_payload(s, self.opt, self.scaler, self.model.fixed_point_cache,
                                        self.model.warm_tensors()))
        self.view.event(f"saved checkpoint {folder}")
        barrier(group)
        return folder


def train(recipe: recipes.Recipe, run_dir: Path, view: View, resume: Path | None = None,
          group: Group = Group()) -> TrainResult:
    """Train per `recipe` into run_dir (see Trainer)."""
    return Trainer(recipe, run_dir, view, resume, group).run()


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


ADVICE = "try a lower optim.lr, deq.jacobian_reg.weight > 0 or model.init_std=0.01"


def _kept(run_dir: Path) -> str:
    ckpts = [c.name for c in checkpoint.checkpoints(run_dir)]
    return f"checkpoints kept: {', '.join(ckpts)}" if ckpts else "no checkpoint was written yet"


def _diverged_message(last_ok: int, step: int, run_dir: Path) -> str:
    steps = f"at step {step}" if step == last_ok + 1 else f"between steps {last_ok + 1} and {step}"
    return f"loss became non-finite {steps}; {_kept(run_dir)}; {ADVICE}"
