"""The data-source registry: built-ins register here exactly as an installed package's
sources (entry-point group `deqctl.data`) or a user's (`data.name: PATH.py:function`)
are found.

A built-in is a `Source`: a loader `(settings, like) -> DataBundle` and its settings
block. A user's source is a function whose keyword arguments are its options and which
returns the arrays an .npz file would hold (x, y, x_test, y_test, optional x_val, y_val);
from there it takes the npz path: shapes, tasks, layout and errors as for `npz`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from ..options import Block
from ..registry import PartError, Registry


@dataclass(frozen=True)
class Source:
    """A built-in data source: how to load it, and its own settings block."""

    load: Callable[..., Any]          # (settings, like: DataInfo | None) -> DataBundle
    settings: type[Block]


def _is_source(obj: Any, ref: str) -> None:
    if not isinstance(obj, Source) and not (callable(obj) and not inspect.isclass(obj)):
        raise PartError(f"{ref}: a data source is a function returning arrays "
                        f"(x, y, x_test, y_test)")


SOURCES = Registry("data source", "data.name", "deqctl.data", check=_is_source)


def source(name: str, settings: type[Block]) -> Callable[[Callable], Callable]:
    """Decorator: register loader `fn(settings, like)` as the built-in source `name`."""
    def add(fn: Callable) -> Callable:
        SOURCES.add(name, Source(fn, settings))
        return fn
    return add
