"""Experiment trackers beside metrics.jsonl: TensorBoard event files, MLflow, Weights &
Biases. Each hears every metrics row and logs its numbers as scalars `split/key` at the
row's step: the same values as metrics.jsonl, which stays the run's record.

    log: {mlflow: true}    # MLflow: MLFLOW_TRACKING_URI, else sqlite ./mlflow.db
    log: {wandb: true}     # W&B offline into RUN/wandb (`wandb sync RUN/wandb/offline-run-*`)

A run's MLflow run and W&B id are kept in RUN/trackers.json, so a resumed run continues
the same tracker run. `log.group` names the MLflow experiment and the W&B group; a sweep
sets it to its folder's name, so a sweep's runs are one experiment. A tracker that fails
mid-run (a locked database, a full disk) is dropped with one warning: training goes on and
metrics.jsonl keeps every row. Adding a tracker: a class with `key`, `extra`, `module`
(the recipe key, the pip extra, the package it imports), `write(row)` and
`close(status)`, listed in TRACKERS.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from ..files import FileRefused, read_json, write_atomic
from ..recipe import RecipeError, flat
from .rundir import TRACKER_IDS

STATUSES = ("finished", "interrupted", "failed")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers as {split/key: value} (booleans and text left out)."""
    return {f"{row['split']}/{k}": float(v) for k, v in row.items()
            if k not in ("step", "split") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def _need(sink: type):
    """Import the sink's package, or RecipeError (one line) naming the extra that
    installs it."""
    try:
        return importlib.import_module(sink.module)
    except ImportError:
        raise RecipeError(f"{sink.key}: needs the {sink.extra} package (pip install "
                          f"'deqctl[{sink.extra}]')") from None


class TensorBoardSink:
    """Event files in RUN/tensorboard, for dashboards that read them."""

    key, extra, module = "log.tensorboard", "tensorboard", "torch.utils.tensorboard"

    def __init__(self, log, run_dir: Path, recipe: dict[str, Any], previous: dict | None,
                 resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: on resume, TensorBoard drops what an earlier attempt logged from there
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        self.ids: dict[str, str] = {}

    def write(self, row: dict[str, Any]) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, row["step"])
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowSink:
    """One MLflow run per deqctl run, named after its folder, in experiment `log.group`
    (default "deqctl"); the flattened recipe as its parameters. The store: log.mlflow_uri,
    else MLFLOW_TRACKING_URI, else a SQLite file ./mlflow.db (MLflow's file store is in
    maintenance mode and refuses new use)."""

    key, extra, module = "log.mlflow", "mlflow", "mlflow"
    _status = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}

    def __init__(self, log, run_dir: Path, recipe: dict[str, Any], previous: dict | None,
                 resume_step: int | None):
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")   # INFO lines would break
        mlflow = _need(type(self))                                   # the live table
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        self.Metric = Metric
        uri = (log.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or f"sqlite:///{Path('mlflow.db').resolve()}")
        with _store_lock(uri):     # parallel runs must not create one database twice
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            name = log.group or "deqctl"
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            run_id = (previous or {}).get("run_id") if (previous or {}).get("uri") == uri else None
            if run_id is not None:
                try:
                    self.client.update_run(run_id, status="RUNNING")
                except MlflowException:
                    run_id = None              # the store no longer holds it: a new run
            if run_id is None:
                run = self.client.create_run(exp_id, run_name=run_dir.name,
                                             tags={"deqctl.run_dir": str(run_dir.resolve())})
                run_id = run.info.run_id
                params = [Param(k, str(v)[:6000]) for k, v in sorted(flat(recipe).items())]
                for i in range(0, len(params), 100):        # MLflow's batch limit
                    self.client.log_batch(run_id, params=params[i:i + 100])
        self.run_id, self.ids = run_id, {"uri": uri, "run_id": run_id}

    def write(self, row: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            self.Metric(k, v, now, row["step"]) for k, v in scalars(row).items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=self._status[status])


class WandbSink:
    """One W&B run per deqctl run, named after its folder, in project log.wandb_project
    and group log.group, offline unless log.wandb_mode says online (nothing leaves the
    machine until `wandb sync`). Every key is plotted against deqctl's `step`."""

    key, extra, module = "log.wandb", "wandb", "wandb"

    def __init__(self, log, run_dir: Path, recipe: dict[str, Any], previous: dict | None,
                 resume_step: int | None):
        wandb = _need(type(self))
        run_id = (previous or {}).get("id") or secrets.token_hex(8)   # W&B ids: [a-z0-9]
        self.run = wandb.init(
            project=log.wandb_project, group=log.group, name=run_dir.name, id=run_id,
            resume="allow", mode=log.wandb_mode, dir=str(run_dir), config=recipe,
            settings=wandb.Settings(console="off", silent=True, disable_git=True,
                                    save_code=False, x_disable_stats=True))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.ids = {"id": run_id}

    def write(self, row: dict[str, Any]) -> None:
        self.run.log({**scalars(row), "step": row["step"]})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


# the order they start in: the stores that can refuse first, before anything is written
TRACKERS = {"mlflow": MLflowSink, "wandb": WandbSink, "tensorboard": TensorBoardSink}


class TrackerError(RuntimeError):
    """A chosen tracker could not start; str() is one line. Nothing was trained."""


def chosen(log) -> list[type]:
    return [cls for name, cls in TRACKERS.items() if getattr(log, name)]


def check(log) -> None:
    """RecipeError (one line) for a chosen tracker whose package is missing: before any work."""
    for cls in chosen(log):
        _need(cls)


class Trackers:
    """The chosen trackers of one run: `write(row)` to each, `close(status)` at the end.
    A tracker that raises is dropped with one `warn` line; the run goes on."""

    def __init__(self, log, run_dir: Path, recipe: dict[str, Any], resume_step: int | None,
                 warn: Callable[[str], None]):
        self.warn, self.live = warn, []
        previous = _read_state(run_dir) if resume_step is not None else {}
        for name, cls in TRACKERS.items():
            if not getattr(log, name):
                continue
            try:
                self.live.append((name, cls(log, run_dir, recipe, previous.get(name),
                                            resume_step)))
            except Exception as exc:
                self.close("failed")
                raise TrackerError(f"{cls.key}: cannot start ({_why(exc)}); nothing was "
                                   f"trained; fix it, or run with {cls.key}=false") from None
        ids = {name: t.ids for name, t in self.live if t.ids}
        if ids:
            write_atomic(run_dir / TRACKER_IDS, json.dumps(ids, indent=1) + "\n")

    def write(self, row: dict[str, Any]) -> None:
        for name, tracker in list(self.live):
            try:
                tracker.write(row)
            except Exception as exc:          # a dashboard never stops training
                self.live.remove((name, tracker))
                self.warn(f"{name}: stopped logging ({_why(exc)}); metrics.jsonl keeps "
                          f"every row")

    def close(self, status: str) -> None:
        for name, tracker in self.live:
            with contextlib.suppress(Exception):
                tracker.close(status)
        self.live = []


def _why(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _read_state(run_dir: Path) -> dict[str, dict]:
    """RUN/trackers.json as {tracker: {key: text}}; anything else (a file someone edited
    or sent) is ignored, and the trackers start new runs."""
    try:
        data = read_json(run_dir / TRACKER_IDS, limit=64 * 1024)
    except (FileRefused, OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {name: {k: v for k, v in ids.items() if isinstance(k, str) and isinstance(v, str)}
            for name, ids in data.items() if name in TRACKERS and isinstance(ids, dict)}


@contextlib.contextmanager
def _store_lock(uri: str):
    """An exclusive lock beside a SQLite store while a run sets itself up in it (two runs
    of a sweep creating its tables at once would collide); other stores need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
