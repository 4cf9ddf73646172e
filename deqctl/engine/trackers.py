"""Experiment trackers beside metrics.jsonl: TensorBoard event files, MLflow, Weights &
Biases. Each hears every metrics row and logs its numbers as scalars `split/key` at the
row's step: the same values as metrics.jsonl, which stays the run's record.

    log: {mlflow: true}    # MLflow: MLFLOW_TRACKING_URI, else sqlite ./mlflow.db
    log: {wandb: true}     # W&B offline into RUN/wandb (`wandb sync RUN/wandb/offline-run-*`)

A run's MLflow run and W&B id are kept in RUN/trackers.json, so a resumed run continues
the same tracker run. `log.group` names the MLflow experiment and the W&B group; a sweep
sets it to its folder's name, so a sweep's runs are one experiment. A tracker that fails
mid-run (a locked database, a full disk) is dropped with one warning: training goes on and
metrics.jsonl keeps every row.

Trackers never hang: before anything is written, `check` tries each chosen tracker's
store, and one that is locked, not a file, or silent for STORE_TIMEOUT_S is one line
(exit 2); so is W&B online with no API key to find. MLflow's HTTP retries and timeout are
bounded for deqctl's calls, and what MLflow logs or prints during them is kept off the
console: deqctl says what failed, once. Adding a tracker: a class with `key`, `extra`,
`module` (the recipe key, the pip extra, the package it imports), `check(log)`,
`write(row)` and `close(status)`, listed in TRACKERS.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import importlib
import json
import logging
import math
import netrc
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from ..errors import quote
from ..files import FileRefused, is_regular, read_json, write_atomic
from ..recipe import RecipeError, flat
from .rundir import TENSORBOARD, TRACKER_IDS

STATUSES = ("finished", "interrupted", "failed")

# How long deqctl waits on a tracker's store before calling it broken: a lock another
# process holds, a connection, one request. Seconds; the README quotes it.
STORE_TIMEOUT_S = 5.0
# How long a run waits for another run (of a sweep) that is creating a new SQLite store's
# tables: under load that alone has taken over 10 s.
SETUP_WAIT_S = 60.0


class TrackerSetupError(RecipeError):
    """A chosen tracker cannot run here: its package is missing, its store refuses or does
    not answer, W&B has no key for online mode. Raised by `check`, before anything is
    written; str() is one line."""


class _Refused(Exception):
    """Why a store cannot be used, as the end of a sentence about it."""


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers as {split/key: value} (booleans and text left out)."""
    return {f"{row['split']}/{k}": float(v) for k, v in row.items()
            if k not in ("step", "split") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def _need(sink: type):
    """Import the sink's package, or TrackerSetupError (one line) naming the extra that
    installs it."""
    try:
        return importlib.import_module(sink.module)
    except ImportError:
        raise TrackerSetupError(f"{sink.key}: needs the {sink.extra} package (pip install "
                                f"'deqctl[{sink.extra}]')") from None


class TensorBoardSink:
    """Event files in RUN/tensorboard, for dashboards that read them."""

    key, extra, module = "log.tensorboard", "tensorboard", "torch.utils.tensorboard"

    def __init__(self, log, run_dir: Path, recipe: dict[str, Any], previous: dict | None,
                 resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: on resume, TensorBoard drops what an earlier attempt logged from there
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD),
                                    purge_step=None if resume_step is None else resume_step + 1)
        self.ids: dict[str, str] = {}

    @staticmethod
    def check(log) -> None:
        """Nothing to try: the event files go into the run's own folder."""

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

    @staticmethod
    def check(log) -> None:
        """TrackerSetupError (one line, naming the setting that chose the store) unless
        the store can be written: a SQLite file that is a regular file (or new) and not
        locked past STORE_TIMEOUT_S, or a server that answers within it."""
        uri, source = _mlflow_store(log)
        try:
            if uri.startswith("sqlite:"):
                path = _sqlite_path(uri)
                if path is not None:
                    _try_sqlite(path)
            else:
                _try_server(uri, log.group or "deqctl")
        except (_Refused, OSError) as exc:
            why = str(exc) if isinstance(exc, _Refused) else f"cannot be used ({_reason(exc)})"
            raise TrackerSetupError(f"{source}: the MLflow store {quote(uri)} {why}; fix it, "
                                    f"or run with log.mlflow=false") from None

    def __init__(self, log, run_dir: Path, recipe: dict[str, Any], previous: dict | None,
                 resume_step: int | None):
        mlflow = _need(type(self))
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        self.Metric = Metric
        uri, _ = _mlflow_store(log)
        path = _sqlite_path(uri) if uri.startswith("sqlite:") else None
        # the lock: parallel runs must not create one database twice
        with _mlflow_calls(), (_store_lock(path) if path else contextlib.nullcontext()):
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
        with _mlflow_calls():
            self.client.log_batch(self.run_id, metrics=[
                self.Metric(k, v, now, row["step"]) for k, v in scalars(row).items()])

    def close(self, status: str) -> None:
        with _mlflow_calls():
            self.client.set_terminated(self.run_id, status=self._status[status])


def _mlflow_store(log) -> tuple[str, str]:
    """The MLflow store's URI and the setting that chose it (log.mlflow_uri,
    MLFLOW_TRACKING_URI, or log.mlflow for the default ./mlflow.db)."""
    if log.mlflow_uri:
        return log.mlflow_uri, "log.mlflow_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    return f"sqlite:///{Path('mlflow.db').resolve()}", "log.mlflow"


def _sqlite_path(uri: str) -> Path | None:
    """The file a sqlite:// URI names, read the way SQLAlchemy (which MLflow opens it
    with) reads it; None for an in-memory database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        database = make_url(uri).database
    except ArgumentError:
        raise _Refused("is not a valid SQLAlchemy URL") from None
    return Path(database) if database and database != ":memory:" else None


def _try_sqlite(path: Path) -> None:
    """_Refused unless `path` is a SQLite file this process can take the write lock of
    within STORE_TIMEOUT_S, or does not exist yet (MLflow creates it)."""
    with _store_lock(path):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device or socket")
            raise _Refused(f"is {kind}, not a SQLite file")
        con = sqlite3.connect(path, timeout=STORE_TIMEOUT_S, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")          # the write lock every row will take
            con.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise _Refused(f"is locked by another process (waited {STORE_TIMEOUT_S:g} "
                               f"s)") from None
            raise _Refused(f"cannot be written ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise _Refused(f"is not a SQLite database ({exc})") from None
        finally:
            con.close()


def _try_server(uri: str, experiment: str) -> None:
    """_Refused unless the store at `uri` answers a read within STORE_TIMEOUT_S. The read
    runs in a thread of its own: a store can stall below any timeout MLflow offers (a
    listener that never answers, a name that takes long to resolve)."""
    import mlflow
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
            outcome.append(None)
        except BaseException as exc:          # reported by the caller, never raised here
            outcome.append(exc)

    asking = threading.Thread(target=ask, name="deqctl-mlflow-check", daemon=True)
    # no retries: a store that is down now fails now, and a request still waiting
    # when the caller gives up ends within one timeout, saying nothing
    with _mlflow_calls(retries=0):
        asking.start()
        asking.join(STORE_TIMEOUT_S)
    if not outcome:
        raise _Refused(f"did not answer within {STORE_TIMEOUT_S:g} s")
    if outcome[0] is not None:
        raise _Refused(f"cannot be used ({_reason(outcome[0])})")


@contextlib.contextmanager
def _mlflow_calls(retries: int = 1) -> Iterator[None]:
    """Around deqctl's calls to MLflow (in the main thread): MLflow's HTTP requests time
    out after STORE_TIMEOUT_S and retry `retries` times (its defaults: 120 s and 7
    retries with backoff, minutes for a store that is down), where the user set neither;
    it prints no run links, and nothing it logs or warns reaches the console, where
    deqctl says what failed in one line. Everything is as it was afterwards."""
    bounds = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(STORE_TIMEOUT_S))),
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    added = [k for k in bounds if k not in os.environ]
    os.environ.update({k: bounds[k] for k in added})
    quiet_before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)       # its tracebacks, retries and table creation
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(quiet_before)
        for k in added:
            os.environ.pop(k, None)


class WandbSink:
    """One W&B run per deqctl run, named after its folder, in project log.wandb_project
    and group log.group, offline unless log.wandb_mode says online (nothing leaves the
    machine until `wandb sync`). Every key is plotted against deqctl's `step`."""

    key, extra, module = "log.wandb", "wandb", "wandb"

    @staticmethod
    def check(log) -> None:
        """TrackerSetupError (one line) for online mode with no API key where W&B looks
        for one: wandb would ask for it on a terminal (waiting for an answer) or fail once
        RUN/wandb is written. The project name is the recipe's to check."""
        if log.wandb_mode == "online" and not _wandb_key_found():
            raise TrackerSetupError(
                "log.wandb_mode: online needs a W&B API key and none was found (neither "
                "WANDB_API_KEY nor a ~/.netrc entry from `wandb login`); set one, or use "
                "log.wandb_mode=offline and `wandb sync` later")

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
    """The tracker classes `log` turns on, in the order they start."""
    return [cls for name, cls in TRACKERS.items() if getattr(log, name)]


def check(log) -> None:
    """TrackerSetupError (one line, exit 2) for a chosen tracker that cannot run here:
    its package missing, its store refusing or silent for STORE_TIMEOUT_S, W&B online
    without a key. Called before any work, and before the run's folder is written (a new
    SQLite store's folder and lock file may be made)."""
    for cls in chosen(log):
        _need(cls)
        cls.check(log)


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
                raise TrackerError(f"{cls.key}: cannot start ({_reason(exc)}); nothing was "
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
                self.warn(f"{name}: stopped logging ({_reason(exc)}); metrics.jsonl keeps "
                          f"every row")

    def close(self, status: str) -> None:
        for name, tracker in self.live:
            with contextlib.suppress(Exception):
                tracker.close(status)
        self.live = []


def _why(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """What went wrong, short: the system's words where a network library buried them
    under its own ("[Errno 111] Connection refused" deep in a retry report), else _why."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]\n]+)", text)
    if found:
        return found.group(1).strip(" :")
    if "timed out" in text.lower():
        return "timed out"
    return _why(exc)


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
def _store_lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside a SQLite store while a run sets itself up in it (two runs
    of a sweep creating its tables at once would collide). _Refused when the lock's place
    holds no regular file, or another process keeps the lock past SETUP_WAIT_S."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = f"{path}.lock"
    try:      # O_NONBLOCK: a FIFO put where the lock goes is refused, not waited on
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _Refused(f"cannot be locked ({quote(lock)}: {exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Refused(f"cannot be locked ({quote(lock)} is not a regular file)")
        deadline = time.monotonic() + SETUP_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _Refused(f"has been locked by another process for over "
                                   f"{SETUP_WAIT_S:g} s ({quote(lock)})") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)                      # which lets the lock go


def _wandb_key_found() -> bool:
    """Whether W&B would find credentials where it looks: WANDB_API_KEY or
    WANDB_IDENTITY_TOKEN_FILE, else an entry with a password for its server (WANDB_BASE_URL,
    else base_url in its settings files, else api.wandb.ai) in the netrc file (NETRC, else
    ~/.netrc or ~/_netrc), as `wandb login` writes it."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or _wandb_setting("base_url")
                    or "https://api.wandb.ai").netloc
    if os.environ.get("NETRC"):
        path = Path(os.environ["NETRC"]).expanduser()
    else:
        home = Path("~").expanduser()
        path = next((p for p in (home / ".netrc", home / "_netrc") if p.exists()),
                    home / ".netrc")
    if not host or not _small_file(path):
        return False
    try:
        found = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(found and found[2])


def _wandb_setting(key: str) -> str | None:
    """`key` from W&B's settings files, the workspace's ./wandb/settings over the global
    one ($WANDB_CONFIG_DIR/settings, else ~/.config/wandb/settings)."""
    config = Path(os.environ.get("WANDB_CONFIG_DIR") or Path("~/.config/wandb").expanduser())
    for path in (Path("wandb") / "settings", config / "settings"):
        if not _small_file(path):
            continue
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.get("default", key, fallback=None):
            return parser.get("default", key)
    return None


def _small_file(path: Path) -> bool:
    """A regular file of at most 1 MB: a FIFO named like a settings file is never read."""
    return is_regular(path) and path.stat().st_size <= 2**20
