"""Number formats shared by every table and line deqctl prints: "-" for a missing value,
"nan"/"inf" as words, percentages that never round a failure away."""

from __future__ import annotations

import math
from typing import Any, Callable

from ..numbers import number

MISSING = "-"


def nonfinite_name(x: float) -> str | None:
    """Return "nan"/"inf"/"-inf" for non-finite ``x``, else None."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None


def _fmt(v: Any, spec: str) -> str:
    """Return ``v`` formatted with ``spec``, "inf"/"nan" as words, or "-" when missing."""
    x = number(v)
    if x is None:
        return MISSING
    return nonfinite_name(x) or format(x, spec)


def fmt_int(v: Any) -> str:
    """Return ``v`` rounded to an integer ("120"), or "-"."""
    return _fmt(v, ".0f")


def fmt_float(v: Any, digits: int = 4) -> str:
    """Return ``v`` with ``digits`` significant digits ("0.3412"), or "-"."""
    return _fmt(v, f".{digits}g")


def fmt_fixed(v: Any, decimals: int = 1) -> str:
    """Return ``v`` with a fixed number of decimals ("9.4"), or "-"."""
    return _fmt(v, f".{decimals}f")


def fmt_sci(v: Any, digits: int = 1) -> str:
    """Return ``v`` in scientific notation ("3.1e-04"), or "-"."""
    return _fmt(v, f".{digits}e")


def fmt_pct(v: Any) -> str:
    """Return a fraction 0..1 as a percentage ("91.2%", exactly 1 -> "100%"), or "-"."""
    x = number(v)
    if x is None:
        return MISSING
    bad = nonfinite_name(x)
    if bad:
        return bad
    if x == 1.0:
        return "100%"
    # 0.9996 must not print as "100.0%": that would hide the one sample that failed.
    pct = min(x * 100.0, 99.9) if x < 1.0 else x * 100.0
    return f"{pct:.1f}%"


def fmt_ms(seconds: Any) -> str:
    """Return a duration in seconds as milliseconds ("41", "3.2"), or "-"."""
    x = number(seconds)
    if x is None:
        return MISSING
    bad = nonfinite_name(x)
    if bad:
        return bad
    ms = x * 1000.0
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}"


def fmt_pair(a: Any, b: Any, fa: Callable[[Any], str], fb: Callable[[Any], str]) -> str:
    """Return "mean/max" ("9.4/14"); just the mean when max is missing; "-" when both are."""
    if number(b) is None:
        return fa(a)
    return f"{fa(a)}/{fb(b)}"
