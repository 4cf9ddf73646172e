"""What every error message shares: a value a user (or a file someone sent) supplied is
quoted short, so a one-line error stays one line whatever the value holds."""

from __future__ import annotations

import reprlib
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
