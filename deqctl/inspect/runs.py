"""Runs side by side: what `deqctl compare` reports of each run directory (its metrics.jsonl,
its recipe, and the task its checkpoint's data description implies)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..keys import K
from ..errors import quote
from ..engine import checkpoint
from ..engine.checkpoint import CheckpointError
from ..engine.metrics import read_rows
from ..engine.rundir import METRICS, RECIPE, in_progress
from ..numbers import finite, strict_json
from ..recipe import flat, load_raw
from ..tasks import Metric, Task, task_for


@dataclass
class RunSummary:
    """One run's figures for the comparison table (None where the run has no data)."""

    name: str
    path: Path
    task: Task = field(repr=False)
    mode: str                          # implicit | unrolled
    model: str
    final: float | None                # headline metric of the last evaluation
    best: float | None                 # ... of the best evaluation
    steps: int
    wall_s: float | None               # training time (evaluations excluded)
    peak_mem_mb: float | None
    fwd_nfe: float | None              # mean forward NFE over training
    converged_start: float | None      # fraction of training solves converged, first row
    converged_end: float | None        # ... last row
    test_converged: float | None       # fraction of test solves converged, last evaluation
    target_step: int | None = None     # first evaluation meeting --target
    target_wall_s: float | None = None
    finished: bool = False             # its final checkpoint holds the final evaluation
    diverged: bool = False             # a non-finite loss ended it
    spikes: int | None = None          # training steps with a loss spike (loss_spikes)
    settings: dict[str, Any] = field(default_factory=dict, repr=False)   # its flat recipe
    train: list[dict[str, Any]] = field(default_factory=list, repr=False)
    evals: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        keys = ("mode", "model", "final", "best", "steps", "wall_s", "peak_mem_mb", "fwd_nfe",
                "converged_start", "converged_end", "test_converged", "target_step",
                "target_wall_s", "finished", "diverged", "spikes")
        return {"name": self.name, "path": str(self.path),
                **{k: strict_json(getattr(self, k)) for k in keys}}


def run_rows(run: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Return the rows of RUN/metrics.jsonl (a last line cut off by a crash left out, with
    a warning); CheckpointError (one line) if it is missing or broken elsewhere."""
    try:
        return read_rows(run / METRICS, warn)
    except FileNotFoundError:
        raise CheckpointError(f"{run}: no metrics.jsonl (not a run directory)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None


def summarise_all(runs: list[Path], target: tuple[str, float] | None = None,
                  warn: Callable[[str], None] | None = None) -> list[RunSummary]:
    """The RunSummary of each run, in order. A run that ended before its first checkpoint
    (one that diverged at once) is read with the task of the others."""
    done: dict[Path, RunSummary] = {}
    for run in runs:
        try:
            done[run] = summarise(run, target, warn)
        except CheckpointError:
            if checkpoint.checkpoints(run) or not (Path(run) / METRICS).is_file():
                raise
    task = next(iter(done.values())).task if done else None
    return [done[r] if r in done else summarise(r, target, warn, task) for r in runs]


def summarise(run: str | Path, target: tuple[str, float] | None = None,
              warn: Callable[[str], None] | None = None, task: Task | None = None
              ) -> RunSummary:
    """Return the RunSummary of a run directory; `target` = (metric key, value). `warn`
    hears of a cut-off last metrics line and of a run still in progress. `task`: that of
    a run without any checkpoint (whose data description is in none)."""
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run directory")
    rows = run_rows(run, warn)
    if task is not None and not checkpoint.checkpoints(run):
        recipe = load_raw(run / RECIPE)              # parsed, not validated
    else:
        folder = checkpoint.resolve(run)             # its meta holds the data description
        note = in_progress(run, folder)
        if note and warn:
            warn(note)
        recipe, info = checkpoint.read_settings(folder)  # read, not validated: nothing imported
        task = task_for(info)
    train = [r for r in rows if r.get(K.split) == "train"]
    evals = [r for r in rows if r.get(K.split) == "test"]
    key = task.headline.key
    scores = [r[key] for r in evals if finite(r.get(key)) is not None]
    best = (max if task.headline.higher_is_better else min)(scores) if scores else None
    s = RunSummary(
        name=run.name, path=run, task=task, mode=_get(recipe, "deq.mode", "implicit"),
        model=str(_get(recipe, "model.name", "resnet_deq")),
        final=scores[-1] if scores else None, best=best,
        steps=max((r.get(K.step, 0) for r in rows), default=0),
        wall_s=_max(rows, K.wall_s), peak_mem_mb=_max(rows, K.peak_mem_mb),
        fwd_nfe=_mean(train, K.fwd_nfe),
        converged_start=finite(train[0].get(K.fwd_converged)) if train else None,
        converged_end=finite(train[-1].get(K.fwd_converged)) if train else None,
        test_converged=finite(evals[-1].get(K.fwd_converged)) if evals else None,
        train=train, evals=evals, settings=flat(recipe) if isinstance(recipe, dict) else {})
    s.finished = checkpoint.is_finished(run)
    # a run that diverged stopped at a train row whose loss is not a number
    s.diverged = not s.finished and bool(train) and finite(train[-1].get(K.loss)) is None
    counts = [r[K.loss_spikes] for r in train if isinstance(r.get(K.loss_spikes), int)]
    s.spikes = sum(counts) if counts else None
    if target is not None:
        metric = metric_for(task, target[0])
        for r in evals:
            v = finite(r.get(metric.key))
            if v is not None and (v >= target[1] if metric.higher_is_better else v <= target[1]):
                s.target_step, s.target_wall_s = r.get(K.step), finite(r.get(K.wall_s))
                break
    return s


def _get(raw: dict, key: str, default: Any) -> Any:
    """A dotted key of a raw recipe, or `default` where it is missing."""
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return default if node is None else node


def metric_for(task: Task, key: str) -> Metric:
    """The task's metric named `key` (or the loss, lower is better); ValueError otherwise."""
    if key == "loss":
        return Metric("loss", "loss", str)
    for m in task.metrics:
        if m.key == key:
            return m
    valid = ", ".join(["loss", *(m.key for m in task.metrics)])
    raise ValueError(f"--target: {quote(key)} is not a metric of {task.name} runs (valid: {valid})")


def same_task(runs: list[RunSummary]) -> None:
    """Raise ValueError (one line) unless every run trained the same task."""
    tasks = {r.task.name for r in runs}
    if len(tasks) > 1:
        listing = ", ".join(f"{r.name}: {r.task.name}" for r in runs)
        raise ValueError(f"runs of different tasks cannot be compared ({listing})")


def _max(rows: list[dict], key: str) -> float | None:
    vals = [v for v in (finite(r.get(key)) for r in rows) if v is not None]
    return max(vals) if vals else None


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [v for v in (finite(r.get(key)) for r in rows) if v is not None]
    return sum(vals) / len(vals) if vals else None
