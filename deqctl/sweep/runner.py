"""Running a sweep's points: each an ordinary `deqctl train` process (`--resume` for a run
begun before), N at once with the CPU threads shared out, watched through their run
directories.

The run directories are the truth: a point is finished when its run's last checkpoint is
`final` with its evaluation; DIR/sweep.json adds what a folder cannot say (a run that
failed, with its last line; the attempts). The sweep holds DIR/.sweep.lock while it runs,
so one command at a time drives a sweep. A first SIGINT or SIGTERM is passed to every
running point, each of which saves an `interrupted` checkpoint and stops; the next sweep
command resumes them. The points die with the sweep (Linux: they get SIGTERM when their
parent dies, even of SIGKILL), so no orphan keeps a run locked.
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
from typing import Callable

from ..engine.checkpoint import checkpoints, is_finished
from ..engine.rundir import live_holder
from ..engine.signals import StopOnSignal
from ..files import free_name
from .plan import Plan, Point, SweepError

INTERRUPTED_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM)
LOGS = "logs"
TAIL_BYTES = 16384


def last_rows(run: Path) -> dict[str, dict]:
    """The last train and test rows of a run's metrics.jsonl (its tail only), for the view."""
    path = run / "metrics.jsonl"
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


def train_command(plan: Plan, point: Point, run: Path, resume: bool) -> list[str]:
    """The `deqctl train` command of a point: a new run, or the resumption of its own."""
    if resume:     # the sweep's user chose its recipe, user code included
        return ["deqctl", "train", "--resume", str(run), "--trust-code", "--plain"]
    return ["deqctl", "train", plan.recipe, *point.overrides, *_group(plan, run), "--out",
            str(run), "--plain"]


def _group(plan: Plan, run: Path) -> list[str]:
    """log.group = the sweep's folder name (quoted: a name like 2024 stays text), so a
    sweep's runs are one MLflow experiment / W&B group, unless the plan names its own."""
    keys = [o.split("=", 1)[0].strip() for o in plan.fixed] + [k for k, _ in plan.axes]
    return [] if "log.group" in keys else [f"log.group={json.dumps(run.parent.name)}"]


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
                 on_event: Callable[[str, Point, str], None] = lambda *a: None,
                 view: Callable[["SweepRunner"], None] = lambda r: None):
        self.plan, self.folder, self.jobs = plan, folder, jobs
        self.retry_failed = retry_failed
        self.on_event, self.view = on_event, view
        self.running: dict[str, Job] = {}
        self.interrupted = False
        self.threads = max(1, (os.cpu_count() or 1) // jobs)

    # -- what each point needs ------------------------------------------------------------
    def todo(self) -> list[tuple[Point, bool]]:
        """The points to run now, each with whether it resumes a run; the statuses of the
        others brought up to date from their run directories."""
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
        holder = live_holder(run) if run.exists() else None
        while holder is not None:         # a point of a sweep just killed, still saving
            self.on_event("note", point, f"waiting for {holder.describe()} to release {run}")
            time.sleep(1.0)
            holder = live_holder(run)
        argv = train_command(self.plan, point, run, resume)
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
