"""The time stamps of a forecast: the series' own time column continued past its end, at
the series' step and written the way the column writes them (YYYYMMDD, ISO dates or
date-times, plain numbers such as years or week numbers)."""

from __future__ import annotations

import calendar
import re
import statistics
from datetime import datetime, timedelta

from ..errors import quote

# the time stamps at a series' end that its step is read from: a forecaster's input keeps
# at least these rows
STAMPS_READ = 64
_COMPACT = re.compile(r"^\d{8}$")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def continue_times(stamps: list[str], count: int) -> list[str]:
    """The `count` stamps after the last of `stamps` (a sorted time column, at least two
    entries; one entry steps by 1 or one day). Dates step by calendar months or years when
    the series does (a monthly series stays on its day of the month), else by the median
    gap; numbers by the median gap, with the column's decimals. ValueError for a column
    that mixes formats or that is not a time."""
    if not stamps:
        raise ValueError("no time stamps to continue")
    kind = _kind(stamps[-1])
    if any(_kind(s) != kind for s in stamps[-STAMPS_READ:]):
        raise ValueError(f"the time column mixes formats (last {quote(stamps[-1])})")
    if kind == "number":
        return _numbers(stamps, count)
    moments = [_moment(s, kind) for s in stamps[-STAMPS_READ:]]
    gaps = [(b - a).total_seconds() / 86400 for a, b in zip(moments, moments[1:])]
    step = statistics.median(gaps) if gaps else 1.0
    last = moments[-1]
    if 28 <= step <= 31:
        out = [_add_months(last, k) for k in range(1, count + 1)]
    elif 365 <= step <= 366:
        out = [_add_months(last, 12 * k) for k in range(1, count + 1)]
    else:
        out = [last + timedelta(days=step * k) for k in range(1, count + 1)]
    return [_write(m, kind, stamps[-1]) for m in out]


def _kind(text: str) -> str:
    text = text.strip()
    if _COMPACT.match(text):
        return "compact"
    if _ISO_DATE.match(text):
        return "date"
    try:
        float(text)
        return "number"
    except ValueError:
        pass
    try:
        datetime.fromisoformat(text)
        return "datetime"
    except ValueError:
        raise ValueError(f"time {quote(text)} is neither a number nor a date") from None


def _moment(text: str, kind: str) -> datetime:
    text = text.strip()
    if kind == "compact":
        return datetime(int(text[:4]), int(text[4:6]), int(text[6:]))
    return datetime.fromisoformat(text)


def _add_months(moment: datetime, months: int) -> datetime:
    """`moment` `months` later, on the same day of the month (the month's last day when it
    is shorter, or when `moment` is itself a month's end)."""
    y, m = divmod(moment.month - 1 + months, 12)
    year, month = moment.year + y, m + 1
    days = calendar.monthrange(year, month)[1]
    month_end = moment.day == calendar.monthrange(moment.year, moment.month)[1]
    return moment.replace(year=year, month=month, day=days if month_end else min(moment.day, days))


def _write(moment: datetime, kind: str, like: str) -> str:
    if kind == "compact":
        return moment.strftime("%Y%m%d")
    if kind == "date":
        return moment.date().isoformat()
    return moment.isoformat(sep="T" if "T" in like else " ")


def _numbers(stamps: list[str], count: int) -> list[str]:
    values = [float(s) for s in stamps[-STAMPS_READ:]]
    gaps = [b - a for a, b in zip(values, values[1:])]
    step = statistics.median(gaps) if gaps else 1.0
    decimals = max((len(s.strip().partition(".")[2]) for s in stamps[-STAMPS_READ:]
                    if "e" not in s.lower()), default=0)
    # decimals enough for the step too (weeks as fractions of a year: 1958.23, 1958.25, ...)
    return [f"{values[-1] + step * k:.{decimals}f}" for k in range(1, count + 1)]


def row_numbers(rows: int, count: int) -> list[str]:
    """A series without a time column: its rows are numbered 0, 1, ...; the forecast
    continues the numbering."""
    return [str(rows + k) for k in range(count)]

