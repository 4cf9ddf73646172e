"""A run directory's layout, and its one writer.

    RUN/recipe.yaml  RUN/metrics.jsonl  RUN/checkpoints/NAME/  RUN/.lock
    RUN/tensorboard/  RUN/wandb/  RUN/trackers.json   (trackers, when a recipe asks)

A new run's folder is claimed with mkdir, which is atomic: of runs started in the same
second under one default name, each gets its own folder (NAME-TIME, NAME-TIME-2, ...).
The writer holds RUN/.lock while it runs: an flock, which the kernel releases however the
process ends (a SIGKILL included), with the holder's pid, host and start time inside for
messages. A lock whose flock is free was left by a process that is gone: it is stale, and
the next writer takes it over. Readers (eval, compare, ...) never take the lock; they read
its content to say that a run is still in progress.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RECIPE, METRICS, CHECKPOINTS, LOCK = "recipe.yaml", "metrics.jsonl", "checkpoints", ".lock"
# a checkpoint folder, CHECKPOINTS/NAME/ (engine.checkpoint): its recipe is RECIPE too
WEIGHTS, META, TOKENIZER = "model.safetensors", "meta.json", "tokenizer.json"
TRAINER_TENSORS, TRAINER_SCALARS = "trainer.safetensors", "trainer.json"
TRACKER_IDS = "trackers.json"   # the tracker runs a resume continues (engine.trackers)
TENSORBOARD, WANDB = "tensorboard", "wandb"     # the trackers' own folders
RUN_ENTRIES = (RECIPE, METRICS, CHECKPOINTS, TENSORBOARD, WANDB, TRACKER_IDS, LOCK)
RUNS = Path("runs")


class RunDirError(ValueError):
    """A run directory cannot be claimed: it holds another run, or another live process
    is writing it; str() is one line saying which and what to do."""


def is_checkpoint(folder: Path) -> bool:
    """True for a checkpoint folder (weights and meta.json)."""
    return (folder / WEIGHTS).is_file() and (folder / META).is_file()


def is_run(folder: Path) -> bool:
    """True for a run directory (its recipe, and metrics, checkpoints or a lock)."""
    return (folder / RECIPE).is_file() and any(
        os.path.lexists(folder / entry) for entry in (METRICS, CHECKPOINTS, LOCK))


def _proc_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux), which tells a
    reused pid from the process that wrote a lock."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Holder:
    """Who writes a run: what a lock file holds."""

    pid: int
    host: str
    started: float              # time.time() when the lock was taken
    proc_start: int | None = None

    @classmethod
    def me(cls) -> "Holder":
        return cls(os.getpid(), socket.gethostname(), time.time(), _proc_start(os.getpid()))

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} (since {when})"

    def alive(self) -> bool:
        """False when the process is known to be gone; True when it runs, or runs on
        another host (which this one cannot tell)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass                # another user's process: it exists
        started = _proc_start(self.pid)
        return self.proc_start is None or started is None or started == self.proc_start


def _open_lock(path: Path, flags: int) -> int:
    """Open a lock file that is a regular file, never through a symlink (a run folder
    someone sent may hold a link to any file); RunDirError otherwise."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise RunDirError(f"{path}: not a regular file (a symlink, folder or device); "
                              f"a run's lock is its own file: remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirError(f"{path}: not a regular file; a run's lock is its own file: remove it")
    return fd


def _holder_of(text: str) -> Holder | None:
    """The holder a lock's content names, or None when it is not a plausible one."""
    try:
        d = json.loads(text)
        pid, host, started = d["pid"], d["host"], d["started"]
        proc_start = d.get("proc_start")
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if not (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31
            and isinstance(host, str) and 0 < len(host) <= 255 and "\n" not in host
            and isinstance(started, (int, float)) and math.isfinite(started)
            and 0 <= started < 1e11):
        return None
    ok_start = isinstance(proc_start, int) and not isinstance(proc_start, bool) and proc_start >= 0
    return Holder(pid, host, float(started), proc_start if ok_start else None)


def read_holder(run_dir: Path) -> Holder | None:
    """The holder named in RUN/.lock, or None (no lock, or an unreadable one)."""
    try:
        fd = _open_lock(Path(run_dir) / LOCK, os.O_RDONLY)
    except (OSError, RunDirError):
        return None
    try:
        return _holder_of(os.read(fd, 4096).decode("utf-8", "replace"))
    finally:
        os.close(fd)


def live_holder(run_dir: Path) -> Holder | None:
    """The holder of a run that is in progress, or None when no live process writes it.
    The flock decides (a lock whose flock is free was left by a process on this host
    that is gone; a holder on another host may hold it where flocks do not cross hosts,
    so it is taken for alive); where the filesystem has none, the holder's pid and host do."""
    path = Path(run_dir) / LOCK
    try:
        fd = _open_lock(path, os.O_RDONLY)
    except (OSError, RunDirError):
        return None
    try:
        holder = _holder_of(os.read(fd, 4096).decode("utf-8", "replace"))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:            # a writer holds it
            return holder or Holder(0, "?", time.time())
        except OSError:                    # no flock here: the content decides
            return holder if holder is not None and holder.alive() else None
        remote = holder is not None and holder.host != socket.gethostname()
        return holder if remote else None  # free: whoever wrote it here is gone
    finally:
        os.close(fd)


class RunLock:
    """The lock of one run directory, held from `acquire` to `release` (or the end of a
    `with` block). `stale` names the holder of a lock left by a process that is gone."""

    def __init__(self, run_dir: Path, fd: int, created: bool, stale: Holder | None):
        self.run_dir, self._fd, self._created, self.stale = Path(run_dir), fd, created, stale

    @classmethod
    def acquire(cls, run_dir: Path, created: bool = False) -> "RunLock":
        """Take RUN/.lock; RunDirError (one line) while another live process holds it."""
        path = Path(run_dir) / LOCK
        attempts = 0
        while True:
            fd = _open_lock(path, os.O_RDWR | os.O_CREAT)
            try:
                state = _flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if state == "held" and attempts < 10:
                # a reader's shared probe lasts microseconds: look again before refusing
                os.close(fd)
                attempts += 1
                time.sleep(0.05)
                continue
            previous = _holder_of(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            busy = state == "held" or (state == "unsupported" and previous is not None
                                       and previous.alive() and previous.pid != os.getpid())
            if busy:
                os.close(fd)
                raise _busy(run_dir, previous)
            # the file locked must still be the one at `path`: a writer that was releasing
            # it unlinked it, and the next one creates a new file
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(Holder.me())).encode(), 0)
        os.fsync(fd)
        return cls(run_dir, fd, created, previous)

    def release(self) -> None:
        """Drop the lock (and the folder, when this writer created it and left it empty)."""
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.run_dir / LOCK)
        os.close(self._fd)
        self._fd = -1
        if self._created:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()         # only if empty: nothing was written

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(fd: int) -> str:
    """Take an exclusive flock without waiting: "taken", "held" (by another open file:
    another process, or another writer in this one), or "unsupported" where the
    filesystem has no flock (the lock's content then decides)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "taken"
    except BlockingIOError:
        return "held"
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return "unsupported"
        raise


def _busy(run_dir: Path, holder: Holder | None) -> RunDirError:
    if holder is None or holder.pid == 0:
        return RunDirError(f"{run_dir} is being written by another process; wait for it "
                           f"to finish, or stop it")
    remote = holder.host != socket.gethostname()
    hint = (f"; if that process is gone, delete {Path(run_dir) / LOCK}" if remote else
            "; wait for it to finish, or stop it (its checkpoint lets you --resume)")
    return RunDirError(f"{run_dir} is being written by {holder.describe()}{hint}")


def claim_new(out: Path | None, name: str) -> RunLock:
    """Claim the folder of a new run and lock it: `out` (which must not exist or be
    empty), or runs/NAME-TIME with a -2, -3, ... suffix when another run took that name."""
    if out is None:
        base = RUNS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        RUNS.mkdir(exist_ok=True)
        k = 1
        while True:
            candidate = base if k == 1 else base.with_name(f"{base.name}-{k}")
            try:
                os.mkdir(candidate)
            except FileExistsError:
                k += 1
                continue
            return RunLock.acquire(candidate, created=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(out)
        created = True
    except FileExistsError:
        created = False
        _refuse_taken(out)
    lock = RunLock.acquire(out, created)
    try:                            # written to between the check and the lock?
        _refuse_taken(out, ignore=(LOCK,))
    except RunDirError:
        lock.release()
        raise
    return lock


def _refuse_taken(out: Path, ignore: tuple[str, ...] = ()) -> None:
    if not out.is_dir():
        raise RunDirError(f"--out {out}: exists and is not a folder; choose another --out")
    holder = live_holder(out)
    if holder is not None and holder.pid != os.getpid():
        raise _busy(out, holder)
    if (out / METRICS).exists():
        raise RunDirError(f"{out} already holds a run; choose another --out or use "
                          f"--resume {out}")
    # a lock alone was left by a run killed before it wrote anything: that folder is free
    if any(p.name not in (*ignore, LOCK) for p in out.iterdir()):
        raise RunDirError(f"{out} exists and is not empty; choose another --out")


def lock_existing(run_dir: Path) -> RunLock:
    """Lock the folder of a run being resumed; RunDirError while another process writes
    it, or when its own files are not its own (see check_own_files)."""
    check_own_files(Path(run_dir))
    return RunLock.acquire(Path(run_dir))


def check_own_files(run_dir: Path) -> None:
    """RunDirError unless the run's entries are what deqctl made them: regular files and
    real folders, no symlinks (a run folder someone sent could point its metrics, lock
    or checkpoints at files elsewhere, which a resume would then write or delete)."""
    kinds = {RECIPE: stat.S_ISREG, METRICS: stat.S_ISREG, LOCK: stat.S_ISREG,
             CHECKPOINTS: stat.S_ISDIR, TENSORBOARD: stat.S_ISDIR, WANDB: stat.S_ISDIR,
             TRACKER_IDS: stat.S_ISREG}
    entries = [(run_dir / name, kind) for name, kind in kinds.items()]
    folder = run_dir / CHECKPOINTS
    if folder.is_dir() and not folder.is_symlink():
        entries += [(c, stat.S_ISDIR) for c in folder.iterdir()]
        entries += [(f, stat.S_ISREG) for c in folder.iterdir()
                    if c.is_dir() and not c.is_symlink() for f in c.iterdir()]
    for path, kind in entries:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode) or not kind(mode):
            what = "a symlink" if stat.S_ISLNK(mode) else "not a regular file or folder"
            raise RunDirError(f"{path}: {what}; a run's files must be its own (resume a "
                              f"copy whose files are real)")


def in_progress(path: Path, folder: Path) -> str | None:
    """For a reader of `path` (a run, or a checkpoint in one) that opened checkpoint
    `folder`: one line saying the run is still being trained, or None."""
    path = Path(path)
    run = path if is_run(path) else path.parent.parent
    holder = live_holder(run) if is_run(run) else None
    if holder is None:
        return None
    return (f"{run} is still being trained ({holder.describe()}): reading its last complete "
            f"checkpoint, {Path(folder).name}")
