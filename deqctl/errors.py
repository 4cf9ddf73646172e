"""What every error message shares: a value a user (or a file someone sent) supplied is
quoted short, so a one-line error stays one line whatever the value holds; an error
raised inside a user's code names that code's file and line; and the whole chain of an
error can be shown on request."""

from __future__ import annotations

import functools
import reprlib
import sysconfig
import traceback
from pathlib import Path
from typing import Any

QUOTE_LIMIT = 80

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = QUOTE_LIMIT
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """repr(value), at most about `limit` characters: longer values are cut, with "..."
    and their full length, and large containers are summarised (never expanded whole)."""
    text = _repr.repr(value)
    if len(text) <= limit:
        return text
    size = f", {len(value)} characters" if isinstance(value, str) else ""
    return f"{text[:limit - 3]}...{size}"


def text_of(exc: BaseException) -> str:
    """str(exc), or a stand-in naming its type when its own `__str__` fails: a user's
    exception can raise anything from there, and its error line must still be printed."""
    try:
        return str(exc)
    except (Exception, SystemExit):
        return f"(its message could not be shown: {type(exc).__name__}.__str__ failed)"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of `exc`'s text, at most `limit` characters."""
    return (text_of(exc).strip().splitlines() or [""])[0][:limit]


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of `exc`'s traceback that is a user's code: neither deqctl's nor
    Python's nor an installed library's. It is the user's line that raised, or that called
    the library call that raised (a bad argument to `nn.Linear`); None when no user code
    was running."""
    frames = traceback.extract_tb(exc.__traceback__)
    at = _user_index(frames)
    return None if at is None else frames[at]


def from_user_code(exc: BaseException) -> str | None:
    """One line saying what `exc` is and where in a user's code it was raised, e.g.
    "TypeError in user code at /x/cell.py:16 (in __init__): ..."; None when it was not.
    An exit (SystemExit, another BaseException) is the user's only when none of deqctl's
    code ran below their line: deqctl's own signal handler, which ends a run with
    SystemExit, may well interrupt a user's forward."""
    frames = traceback.extract_tb(exc.__traceback__)
    at = _user_index(frames)
    if at is None:
        return None
    if not isinstance(exc, Exception) and any(_is_deqctl(f.filename) for f in frames[at + 1:]):
        return None
    frame = frames[at]
    said = _exit_text(exc) if isinstance(exc, SystemExit) else first_line(exc)
    return (f"{type(exc).__name__} in user code at {frame.filename}:{frame.lineno} "
            f"(in {frame.name}): {said}")


def _exit_text(exc: SystemExit) -> str:
    """What a user's sys.exit(...) said: its message, or the exit code it asked for."""
    if isinstance(exc.code, str):
        return first_line(exc)
    return f"exit code {0 if exc.code is None else quote(exc.code)}"


def _user_index(frames: traceback.StackSummary) -> int | None:
    for i in range(len(frames) - 1, -1, -1):
        name = frames[i].filename
        if not name.startswith("<") and not _is_library(name):
            return i
    return None


@functools.lru_cache(maxsize=1)
def _libraries() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    found = {Path(paths[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return (*found, Path(__file__).resolve().parent)          # ... and deqctl itself


def _is_library(filename: str) -> bool:
    path = Path(filename).resolve()
    return any(path.is_relative_to(lib) for lib in _libraries())


def _is_deqctl(filename: str) -> bool:
    return not filename.startswith("<") and \
        Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)


def with_whole_chain(exc: BaseException) -> BaseException:
    """`exc` with every error it came from shown by `traceback`, even those a one-line
    message hid with `raise ... from None` (DEQCTL_TRACEBACK=1 asks for all of them)."""
    seen, link = set(), exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__suppress_context__ = False
        link = link.__cause__ or link.__context__
    return exc
