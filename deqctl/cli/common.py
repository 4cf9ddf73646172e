"""What every command shares: turning the errors a user can cause into one line + exit code."""

from __future__ import annotations

import contextlib
import functools
import os
import select
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..data import DataError
from ..engine.checkpoint import CheckpointError
from ..engine.device import DeviceError
from ..engine.rundir import RunDirError
from ..engine.usercode import CodeChanged
from ..errors import first_line, from_user_code, text_of, with_whole_chain
from ..files import FileRefused, OutputError
from ..models import ModelError
from ..recipe import RecipeError

USAGE, FAILED, INTERRUPTED = 2, 1, 130

# deqctl's own errors in what the user asked for, and a missing file: usage, exit 2
DEQCTL_ERRORS = (RecipeError, DataError, ModelError, CheckpointError, DeviceError,
                 RunDirError, OutputError, FileRefused)
INPUT_ERRORS = (*DEQCTL_ERRORS, FileNotFoundError)


TRUST_CODE = typer.Option(False, "--trust-code", help="import the user code (model, solver "
                          "or data by import path) this run or checkpoint names: it runs that "
                          "code, so only for runs you trust")


def say_user_code(recipe) -> None:
    """The first line of a command that imported user code a recipe names."""
    for key, part in recipe.user_code().items():
        typer.echo(f"user code: {key}={part.ref} imported from {part.path} "
                   f"(sha256 {part.sha256[:12] if part.sha256 else '?'})")


def fail(message: str, code: int) -> None:
    """Print `error: message` to stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def residual_stops_only(src, command: str) -> None:
    """Refuse a readout stop (deq.eval.stop_mode kl or argmax) where `command` runs the
    residual-stopped solve alone (a trace of residuals; an artefact whose graph unrolls
    the cell): it would be dropped silently, or checked against another solve."""
    rule = src.model.deq.readout_stop
    if rule is not None:
        fail(f"deq.eval.stop_mode={rule.mode}: {command} solves to the residual's "
             f"tolerance only; set abs or rel (eval, predict and generate stop on the readout)",
             USAGE)


def user_errors(fn: Callable) -> Callable:
    """Decorate a command so input errors exit 2 and runtime failures exit 1, no traceback;
    whatever a user's code raised or exited with names its file and line, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", CodeChanged)
                warnings.showwarning = _one_line
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(INTERRUPTED)
        except BaseException as exc:
            said = _error_line(exc)
            if said is None:        # an exit of deqctl's or a library's: it stands
                raise
            _show_chain(exc)
            fail(*said)

    return wrapper


def _error_line(exc: BaseException) -> tuple[str, int] | None:
    """The error line of `exc` and its exit code; None for an exit not raised by user code."""
    hint = "" if _traceback_asked() else " (DEQCTL_TRACEBACK=1 shows the traceback)"
    where = None if isinstance(exc, DEQCTL_ERRORS) else from_user_code(exc)
    if where is not None:       # a user's OSError is theirs, not a missing input
        return one_line(where) + hint, FAILED
    if isinstance(exc, RecipeError):     # a header line and one line per error, by design
        return text_of(exc), USAGE
    if isinstance(exc, INPUT_ERRORS):
        return one_line(text_of(exc)), USAGE
    if not isinstance(exc, Exception):
        return None
    return one_line(f"{type(exc).__name__}: {first_line(exc)}") + hint, FAILED


def _traceback_asked() -> bool:
    return os.environ.get("DEQCTL_TRACEBACK", "") not in ("", "0")


def _show_chain(exc: BaseException) -> None:
    """With DEQCTL_TRACEBACK=1: the traceback of `exc` and of every error it came from,
    on stderr, before its one line."""
    if _traceback_asked():
        traceback.print_exception(with_whole_chain(exc), file=sys.stderr)


def _one_line(message, category, *args, **kwargs) -> None:
    typer.echo(f"warning: {message}", err=True)


def one_line(message: str) -> str:
    """`message` on one line: a name holding a newline (a folder, a path) cannot forge a
    second `error:` line."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


@contextlib.contextmanager
def reader_may_leave() -> Iterator[None]:
    """A reader that stops reading what a command prints (`deqctl eval RUN | head -1`,
    `deqctl generate RUN | head -c 100`) has what it wanted: the command stops there,
    quietly, with exit 0 (as the shell's own tools end in a pipeline), never with a
    BrokenPipeError. As a decorator (under @user_errors) it covers a whole command."""
    try:
        yield
    except (BrokenPipeError, SystemExit) as exc:
        # a Rich console ends the process itself on a broken pipe: SystemExit(1), raised
        # while handling the BrokenPipeError
        if isinstance(exc, SystemExit) and not isinstance(exc.__context__, BrokenPipeError):
            raise
        if isinstance(exc, BrokenPipeError) and not _stdout_reader_gone():
            raise       # another pipe (user code's socket, a subprocess): a real failure
        try:    # Python flushes stdout once more at exit: into /dev/null that cannot fail
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (AttributeError, OSError, ValueError):    # not a file (an in-process test)
            pass
        raise typer.Exit(0) from None


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (poll reports an error on its write
    end); True where that cannot be told (no poll, stdout not a file)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def split_args(args: list[str] | None) -> tuple[str | None, list[str]]:
    """Split positional args into an optional leading path and `key=value` overrides. The
    first argument is a path when it has no '=' or names an existing file or folder (a run
    may well be called runs/lr=1e-3)."""
    args = list(args or [])
    if args and ("=" not in args[0] or Path(args[0]).exists()):
        return args[0], args[1:]
    return None, args


def progress_bar(console: Console) -> Progress:
    """A transient bar on `console` (stderr); off when it is not a terminal (logs, pipes,
    tests)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


