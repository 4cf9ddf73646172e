"""Running a sweep's points: each an ordinary `deqctl train` process (`--resume` for a run
begun before), N at once with the CPU threads shared out, watched through their run
directories.

The run directories are the truth: a point is finished when its run's last checkpoint is
`final` with its evaluation; DIR/sweep.json adds what a folder cannot say (a run that
failed, with its last line; the attempts). A folder may have been sent by someone else, so
before a run is resumed or counted, it must be the point the plan makes: the recipe the
plan's recipe and overrides resolve to, and no user code but the plan's own (a sweep
imports only the code its user named, unless --trust-code). The sweep holds
DIR/.sweep.lock while it runs, so one command at a time drives a sweep. A first SIGINT or
SIGTERM is passed to every running point, each of which saves an `interrupted` checkpoint
and stops; the next sweep command resumes them. The points die with the sweep (Linux:
they get SIGTERM when their parent dies, even of SIGKILL), so no orphan keeps a run
locked; a point folder is never judged or moved while a live process still writes it.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection

from .. import recipe as recipes
from ..engine.checkpoint import JSON_LIMIT, checkpoints, is_finished
from ..engine.rundir import META, METRICS, RECIPE, live_holder
from ..engine.signals import StopOnSignal
from ..errors import quote
from ..files import free_name, read_json
from ..implicit.settings import solver_refs
from ..registry import is_import_path
from .plan import Plan, Point, SweepError, planned_recipe, point_overrides, sweep_overrides

INTERRUPTED_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM)
LOGS = "logs"
TAIL_BYTES = 16384


def last_rows(run: Path) -> dict[str, dict]:
    """The last train and test rows of a run's metrics.jsonl (its tail only), for the view."""
    path = run / METRICS
    try:
        with open(path, "rb") as fh:
            start = max(0, os.fstat(fh.fileno()).st_size - TAIL_BYTES)
            fh.seek(start)
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return {}
    lines = lines[1:] if start else lines        # the first may be cut off
    out: dict[str, dict] = {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("split") in ("train", "test"):
            out[row["split"]] = row
    return out


def train_command(plan: Plan, point: Point, run: Path, resume: bool,
                  trust_code: bool = False) -> list[str]:
    """The `deqctl train` command of a point: a new run, or the resumption of its own
    (`trust_code`: its run names user code, checked to be what the user chose)."""
    if resume:
        return ["deqctl", "train", "--resume", str(run), *(["--trust-code"] * trust_code),
                "--plain"]
    return ["deqctl", "train", plan.recipe, *point_overrides(plan, point, run.parent),
            "--out", str(run), "--plain"]


def user_refs(raw: object) -> dict[str, str]:
    """{key: import path} of the user code a stored recipe names, read, never imported."""
    if not isinstance(raw, dict):
        return {}
    named = [(f"{s}.name", raw[s].get("name")) for s in recipes.DEFAULT_NAMES
             if isinstance(raw.get(s), dict)]
    named += [(f"deq.{key}", ref) for key, ref in solver_refs(raw.get("deq"))]
    return {key: ref for key, ref in named if isinstance(ref, str) and is_import_path(ref)}


def differences(planned: recipes.Recipe, raw: object, labels: Collection[str] = ()
                ) -> list[str]:
    """The settings where a stored recipe is not `planned`, `labels` aside, compared as
    resolved data (a recipe of built-in parts is validated, without importing, so that
    defaults an older version left out are filled in); keys the planned recipe lacks are
    counted, not named (they come from a file someone sent)."""
    try:
        raw = recipes.validate(recipes.migrate(raw), trust=False).model_dump(mode="json")
    except (ValueError, TypeError):   # user code (compared as written), or invalid
        raw = recipes.migrate(raw)
    want = recipes.flat(planned.model_dump(mode="json"))
    got = recipes.flat(raw) if isinstance(raw, dict) else {}
    missing = object()
    differ = [k for k in want if k not in labels and got.get(k, missing) != want[k]]
    extra = sum(k not in want for k in got)
    return differ + ([f"{extra} setting(s) of its own"] if extra else [])


def code_records(checkpoint: Path) -> dict[str, object]:
    """{key: recorded path} of the user code a checkpoint's meta.json says it imported: the
    files a resume looks in first."""
    try:
        code = read_json(checkpoint / META, JSON_LIMIT).get("code")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(code, dict):
        return {}
    return {k: r.get("path") if isinstance(r, dict) else r for k, r in code.items()}


def shell_command(plan: Plan, point: Point, folder: Path) -> str:
    """The command line a scheduler's job array runs for one point."""
    return shlex.join(train_command(plan, point, folder / point.name, resume=False)[:-1])


@dataclass
class Job:
    point: Point
    run: Path
    proc: subprocess.Popen
    log: object
    started: float = field(default_factory=time.time)


class SweepRunner:
    """Runs the points of `plan` under `folder`, `jobs` at a time. `on_event(kind, point,
    text)` hears of starts and ends ("start", "finished", "failed", "interrupted",
    "note"); `view()` is called about five times a second while points run (no thread of
    its own: a process started while another thread runs could deadlock before exec)."""

    def __init__(self, plan: Plan, folder: Path, *, jobs: int = 1, retry_failed: bool = False,
                 trust_code: bool = False,
                 on_event: Callable[[str, Point, str], None] = lambda *a: None,
                 view: Callable[["SweepRunner"], None] = lambda r: None):
        self.plan, self.folder, self.jobs = plan, folder, jobs
        self.retry_failed, self.trust_code = retry_failed, trust_code
        self.trusted: set[str] = set()     # points whose resume imports (their own) user code
        self.on_event, self.view = on_event, view
        self.running: dict[str, Job] = {}
        self.interrupted = False
        self.threads = max(1, (os.cpu_count() or 1) // jobs)

    # -- what each point needs ------------------------------------------------------------
    def todo(self) -> list[tuple[Point, bool]]:
        """The points to run now, each with whether it resumes a run; the statuses of the
        others brought up to date from their run directories. First waits for any live
        process still writing a point folder (a point of a sweep just killed), then
        checks every run there (SweepError, nothing moved or run: see `check_runs`)."""
        for p in self.plan.points:
            self._wait_released(p, self.folder / p.name)
        self.check_runs()
        out = []
        for p in self.plan.points:
            run = self.folder / p.name
            if is_finished(run):
                p.status, p.exit_code, p.message = "finished", 0, None
            elif p.status == "failed" and not self.retry_failed:
                continue
            elif checkpoints(run):
                out.append((p, True))
            else:
                if os.path.lexists(run):     # begun, killed before its first checkpoint
                    aside = free_name(self.folder, f"{p.name}.aborted")
                    os.rename(run, aside)
                    self.on_event("note", p, f"{run} held no checkpoint; moved to {aside}")
                p.status = "pending"
                out.append((p, False))
        return out

    def check_runs(self) -> None:
        """Refuse (SweepError: a header, then one line per point) any point folder
        holding a run that is not that point: another recipe, user code the plan does not
        name, or (without --trust-code) user code recorded at other paths than the plan's,
        which a resume would import. Nothing is imported, moved or run; the folder is left
        as it is. Remembers the points whose resume may import their (planned) user code."""
        bad = []
        for p in self.plan.points:
            run = self.folder / p.name
            found = checkpoints(run)
            if not found:          # nothing to resume or count: begun afresh (see todo)
                continue
            planned = planned_recipe(self.plan, p, self.folder)
            problem = self._foreign(planned, run, found[-1], resumed=not is_finished(run))
            if problem:
                bad.append(f"{p.name}: {problem}".replace("\n", "\\n").replace("\r", "\\r"))
            elif planned.user_code() or self.trust_code:
                self.trusted.add(p.name)
        if bad:
            raise SweepError(
                f"{len(bad)} of {len(self.plan.points)} point folder(s) hold a run that is "
                f"not the sweep's; nothing was run, nothing moved (move each aside, or use "
                f"another --out)\n  " + "\n  ".join(bad[:20]) +
                (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""))

    def _foreign(self, planned: recipes.Recipe, run: Path, last: Path, resumed: bool
                 ) -> str | None:
        """Why the run in `run` (to be resumed from, or counted finished by, checkpoint
        `last`) is not the point `planned`, or None when it is. What the sweep sets by
        itself (its folder's name as log.group) is a label, and may differ."""
        labels = {o.split("=", 1)[0] for o in sweep_overrides(self.plan, self.folder)}
        mine = {key: part.ref for key, part in planned.user_code().items()}
        for where in (run / RECIPE, last / RECIPE):
            try:
                raw = recipes.load_raw(where)
            except recipes.RecipeError as exc:
                return f"{where}: unreadable ({str(exc).splitlines()[0]})"
            other = [(k, ref) for k, ref in user_refs(raw).items() if mine.get(k) != ref]
            if other:
                key, ref = other[0]
                return (f"its run names user code the sweep does not ({key}={quote(ref)}); "
                        f"not imported")
            differ = differences(planned, raw, labels)
            if differ:
                return (f"{where}: not this point's recipe ({', '.join(differ[:6])}"
                        f"{' ...' if len(differ) > 6 else ''} differ)")
        wanted = {key: str(part.path) for key, part in planned.user_code().items()}
        records = code_records(last)
        if resumed and records != wanted and not self.trust_code:   # where a resume imports
            key = next(k for k in sorted(records.keys() | wanted.keys(), key=str)
                       if records.get(k) != wanted.get(k))
            return (f"its run recorded user code {key if key in wanted else quote(key)} "
                    f"from {quote(records.get(key))}, not {quote(wanted.get(key))} as the "
                    f"sweep's recipe names; resuming would import it: --trust-code if you "
                    f"trust this folder")
        return None

    def _wait_released(self, point: Point, run: Path) -> None:
        """Return once no live process writes `run` (a point of a sweep just killed may
        still be saving; a folder is never judged or moved under its writer), saying so
        once however long it takes."""
        holder = live_holder(run) if os.path.lexists(run) else None
        if holder is not None:
            self.on_event("note", point, f"waiting for {holder.describe()} to release {run}")
        while holder is not None:
            time.sleep(0.5)
            holder = live_holder(run)

    # -- the loop ---------------------------------------------------------------------------
    def run(self, queue: list[tuple[Point, bool]]) -> None:
        """Run `queue` (what todo() returned); returns when all ended or a signal stopped
        them."""
        queue = list(queue)
        self.plan.save(self.folder)
        with StopOnSignal() as stop:
            try:
                while queue or self.running:
                    if stop.requested and not self.interrupted:
                        self.interrupted = True
                        queue = []
                        self._signal_all(signal.SIGTERM)
                    while queue and len(self.running) < self.jobs:
                        self._start(*queue.pop(0))
                    self._reap()
                    self.view(self)
                    time.sleep(0.2)
            except (KeyboardInterrupt, SystemExit):   # a second signal: stop them now
                self.interrupted = True
                self._signal_all(signal.SIGTERM)
                while self.running:
                    self._reap()
                    time.sleep(0.1)
        self.plan.save(self.folder)

    def _start(self, point: Point, resume: bool) -> None:
        run = self.folder / point.name
        self._wait_released(point, run)
        argv = train_command(self.plan, point, run, resume, point.name in self.trusted)
        log_dir = self.folder / LOGS
        log_dir.mkdir(exist_ok=True)
        log = open(log_dir / f"{point.name}.log", "a", encoding="utf-8")
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads),
               "MKL_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "deqctl", *argv[1:]], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
        point.status, point.attempts = "running", point.attempts + 1
        self.running[point.name] = Job(point, run, proc, log)
        self.plan.save(self.folder)
        self.on_event("start", point, "resuming" if resume else "starting")

    def _reap(self) -> None:
        for name, job in list(self.running.items()):
            code = job.proc.poll()
            if code is None:
                continue
            job.log.close()
            del self.running[name]
            p = job.point
            p.exit_code = code
            if code == 0 and is_finished(job.run):
                p.status, p.message = "finished", None
            elif code in INTERRUPTED_CODES:
                p.status, p.message = "interrupted", "stopped by a signal; resumes next time"
            else:
                p.status, p.message = "failed", _last_line(self.folder / LOGS / f"{name}.log")
            self.plan.save(self.folder)
            self.on_event(p.status, p, p.message or f"{time.time() - job.started:.0f} s")

    def _signal_all(self, signum: int) -> None:
        for job in self.running.values():
            try:
                job.proc.send_signal(signum)
            except ProcessLookupError:
                pass


def _die_with_parent() -> None:
    """In a point's process, before it runs: SIGTERM when the sweep dies (Linux prctl
    PR_SET_PDEATHSIG), so a killed sweep leaves interrupted checkpoints, not orphans."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _last_line(log: Path) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 4096))
            lines = [line for line in fh.read().decode("utf-8", "replace").splitlines()
                     if line.strip()]
    except OSError:
        return "failed (no log)"
    return lines[-1][:300] if lines else "failed without a message"


class SweepLock:
    """DIR/.sweep.lock, held by the one sweep command driving DIR (an flock: the kernel
    releases it however the command ends)."""

    def __init__(self, folder: Path):
        path = folder / ".sweep.lock"
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(self.fd, 64).decode("ascii", "replace").strip() or "?"
            os.close(self.fd)
            raise SweepError(f"{folder} is being run by another deqctl sweep (pid {other}); "
                             f"wait for it, or stop it (Ctrl-C) first") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        os.close(self.fd)
