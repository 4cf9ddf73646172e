"""What every command shares: turning the errors a user can cause into one line + exit code."""

from __future__ import annotations

import functools
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..data import DataError
from ..engine.checkpoint import CheckpointError
from ..engine.device import DeviceError
from ..engine.rundir import RunDirError
from ..engine.usercode import CodeChanged
from ..errors import from_user_code, with_whole_chain
from ..files import FileRefused, OutputError
from ..models import ModelError
from ..recipe import RecipeError

USAGE, FAILED, INTERRUPTED = 2, 1, 130

# errors in what the user asked for: usage, exit 2
INPUT_ERRORS = (RecipeError, DataError, ModelError, CheckpointError, DeviceError,
                RunDirError, OutputError, FileRefused, FileNotFoundError)


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


def user_errors(fn: Callable) -> Callable:
    """Decorate a command so input errors exit 2 and runtime failures exit 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", CodeChanged)
                warnings.showwarning = _one_line
                return fn(*args, **kwargs)
        except RecipeError as exc:     # a header line and one line per error, by design
            _show_chain(exc)
            fail(str(exc), USAGE)
        except INPUT_ERRORS as exc:
            _show_chain(exc)
            fail(one_line(str(exc)), USAGE)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(INTERRUPTED)
        except Exception as exc:   # anything else: one line, the traceback on request
            _show_chain(exc)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            fail(one_line(from_user_code(exc) or f"{type(exc).__name__}: {first}")
                 + ("" if _traceback_asked() else " (DEQCTL_TRACEBACK=1 shows the traceback)"),
                 FAILED)

    return wrapper


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


