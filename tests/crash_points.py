"""Kill `deqctl` with SIGKILL just before its K-th write under a folder, for every K.

    python crash_points.py FOLDER TRIALS.json

Each trial is {"argv": [...], "kill_at": K, "log": PATH, "output": PATH, "signal": NAME,
"fsize": BYTES} (all but argv and kill_at optional): a forked child runs the
command in-process and kills itself just before its K-th file-system write under FOLDER
(K = 0: never), logs every write it counts into `log` and its stdout and stderr into
`output`. `signal` (SIGINT, SIGTERM) sends that signal instead, once, and lets the run go
on; `fsize` limits every file the child writes to that many bytes (RLIMIT_FSIZE: a write
past it fails as on a full disk). Writes are
counted at the level of the operating system calls Python makes (open for writing,
mkdir, rename, replace, link, unlink, rmtree, truncate, safetensors' save_file), so the
count does not depend on how deqctl is organised. The process that forks imports only
third-party libraries, never runs a tensor op (a fork after one is unsafe), and prints
one JSON list: each trial's exit status, or "killed". Two trials run at a time.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import sys

import safetensors.torch
import torch  # noqa: F401  (imported once here, so each child starts fast)
import typer  # noqa: F401
import yaml  # noqa: F401
import pydantic  # noqa: F401
import rich  # noqa: F401
import matplotlib.backends.backend_agg  # noqa: F401
import matplotlib.figure  # noqa: F401

PARALLEL = 2            # trials at once (each a single-threaded process)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _install(folder: str, kill_at: int, log: str | None, sig: int = signal.SIGKILL) -> None:
    count = 0
    busy = False
    real_open = io.open
    log_file = real_open(log, "w") if log else None

    def hit(kind: str, *paths) -> None:
        nonlocal count
        if busy or not any(str(p).startswith(folder) for p in paths):
            return
        count += 1
        if log_file:
            log_file.write(f"{count} {kind} {' '.join(map(str, paths))}\n")
            log_file.flush()
        if count == kill_at:
            os.kill(os.getpid(), sig)

    def wrap(owner, name, kind, paths=lambda *a, **k: a[:1], when=lambda *a, **k: True):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            nonlocal busy
            if when(*args, **kwargs):
                hit(kind, *paths(*args, **kwargs))
            outer, busy = busy, True        # rmtree's own unlinks are part of one write
            try:
                return real(*args, **kwargs)
            finally:
                busy = outer
        setattr(owner, name, counted)

    def writing_mode(file, mode="r", *a, **k):
        return any(c in mode for c in "wax+")

    for owner in (builtins, io):
        wrap(owner, "open", "open", when=writing_mode)
    wrap(os, "open", "os.open", when=lambda path, flags, *a, **k: bool(flags & WRITE_FLAGS))
    for name in ("mkdir", "unlink", "remove", "rmdir", "truncate"):
        wrap(os, name, name)
    for name in ("rename", "replace", "link"):
        wrap(os, name, name, paths=lambda src, dst, *a, **k: (src, dst))
    wrap(shutil, "rmtree", "rmtree")
    wrap(safetensors.torch, "save_file", "save_file", paths=lambda tensors, path, *a, **k: (path,))


def _child(folder: str, trial: dict) -> None:
    _install(folder, trial["kill_at"], trial.get("log"),
             getattr(signal, trial.get("signal", "SIGKILL")))
    if trial.get("fsize"):
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (trial["fsize"], trial["fsize"]))
    out = os.open(trial.get("output") or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    sys.argv = ["deqctl", *trial["argv"]]
    from deqctl.cli import app
    try:
        app()
    except SystemExit as exc:
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    os._exit(0)


def main() -> None:
    folder, trials = sys.argv[1], json.loads(open(sys.argv[2]).read())
    results: list = [None] * len(trials)
    running: dict[int, int] = {}                   # pid -> trial index
    for i, trial in enumerate(trials + [None] * PARALLEL):
        while running and (len(running) >= PARALLEL or trial is None):
            pid, status = os.wait()
            results[running.pop(pid)] = ("killed" if os.WIFSIGNALED(status)
                                         else os.WEXITSTATUS(status))
        if trial is None:
            continue
        pid = os.fork()
        if pid == 0:
            try:
                _child(folder, trial)
            finally:
                os._exit(99)
        running[pid] = i
    print(json.dumps(results))


if __name__ == "__main__":
    main()
