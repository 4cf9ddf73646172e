"""Time-series forecasting data: a table of measurements (CSV) cut into windows of
`window` past steps and `horizon` future steps, and the embedded Mauna Loa CO2 series.

The series is split chronologically into train | val | test rows before anything else
happens. Empty cells are filled twice: as targets, by linear interpolation inside each
part from that part's own values; as inputs, with the last value observed before them
(a forecaster cannot see later values, so an input gap never borrows from the targets
that follow it). Scaling statistics come from the train rows, a training window's inputs
and targets lie inside the train rows, and an evaluation window's targets lie inside its
own part (its inputs may reach back). So no value of a later part ever shapes training.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import date, datetime
from pathlib import Path

import numpy as np
import torch

from typing import Any

from pydantic import Field, field_validator

from ..errors import quote
from ..files import FileRefused, open_regular
from .arrays import FLOAT32_MAX
from .base import DataBundle, DataError, DataInfo, Split
from .images import EMBEDDED
from .registry import source
from .settings import Forecasting


class CsvData(Forecasting):
    """A table with a header row, forecast column by column."""

    path: str | None = None
    time_column: str | None = Field(None, description="dates or plain numbers (rows are "
                                    "sorted by it); None keeps the file's row order")
    columns: list[str] = Field(default_factory=list, description="target columns to forecast")

    @field_validator("columns", mode="before")
    @classmethod
    def _one_column(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v   # data.columns=co2 on the command line


def parse_time(text: str) -> float | None:
    """Return a time as a number: YYYYMMDD (8 digits) and ISO dates as days since
    0001-01-01, anything numeric as itself; None when unparseable."""
    text = text.strip()
    if len(text) == 8 and text.isdigit():
        try:
            return float(date(int(text[:4]), int(text[4:6]), int(text[6:])).toordinal())
        except ValueError:
            pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.toordinal() + (moment.hour * 3600 + moment.minute * 60 + moment.second) / 86400


def read_table(path: Path, time_column: str | None, columns: list[str]
               ) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Return (times (T,), values (T, C) with NaN for empty cells, the time column's text
    per row or None without one) of a CSV with a header row, sorted by time (file order
    when `time_column` is None)."""
    try:
        with open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig",
                                                         newline="") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise DataError(f"data.path: {path} is not UTF-8 text") from None
    except FileRefused as exc:
        raise DataError(f"data.path: {exc}") from None
    except csv.Error as exc:
        raise DataError(f"data.path: {path} is not a readable CSV ({str(exc)[:80]})") from None
    if not rows:
        raise DataError(f"data.path: {path} is empty")
    header = [h.strip() for h in rows[0]]
    wanted = ([time_column] if time_column else []) + columns
    missing = [c for c in wanted if c not in header]
    if missing:
        key = "data.time_column" if time_column in missing else "data.columns"
        raise DataError(f"{key}: {', '.join(missing)} not in {path.name} "
                        f"(columns: {', '.join(header)})")
    index = {c: header.index(c) for c in wanted}
    times, values, lines, stamps = [], [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue                                    # blank line
        cells = {c: (row[i].strip() if i < len(row) else "") for c, i in index.items()}
        if time_column:
            t = parse_time(cells[time_column])
            if t is None or not math.isfinite(t):
                raise DataError(f"{path.name} line {line}: time {quote(cells[time_column])} is "
                                f"neither a number nor a date")
            times.append(t)
            stamps.append(cells[time_column])
        else:
            times.append(float(len(times)))
        vals = []
        for c in columns:
            try:
                v = float(cells[c]) if cells[c] else math.nan
            except ValueError:
                v = None
            if v is None or (cells[c] and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX)):
                # an empty cell is a gap; "nan" or "inf" written out is a value, and wrong
                raise DataError(f"{path.name} line {line}: {c} = {quote(cells[c])} is not a "
                                f"finite float32 number (leave a cell empty for a gap)")
            vals.append(v)
        values.append(vals)
        lines.append(line)
    if not values:
        raise DataError(f"data.path: {path} has a header but no rows")
    t, v = np.asarray(times), np.asarray(values, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    same = np.flatnonzero(t[1:] == t[:-1])
    if time_column and same.size:
        a, b = sorted((lines[order[same[0]]], lines[order[same[0] + 1]]))
        raise DataError(f"{path.name}: lines {a} and {b} have the same {time_column} "
                        f"({quote(rows[a - 1][index[time_column]].strip())}); each time may "
                        f"appear once")
    return t, v, [stamps[i] for i in order] if time_column else None


def interpolate(times: np.ndarray, values: np.ndarray, columns: list[str], where: str
                ) -> np.ndarray:
    """Return `values` (T, C) with NaNs interpolated linearly in time from the known values
    of the same array (ends take the nearest known value)."""
    out = values.copy()
    for c, name in enumerate(columns):
        known = ~np.isnan(values[:, c])
        if not known.any():
            raise DataError(f"{where}: column {name} has no values at all")
        out[~known, c] = np.interp(times[~known], times[known], values[known, c])
    return out


def carry_forward(values: np.ndarray) -> np.ndarray:
    """Return `values` (T, C) with each NaN replaced by the last value before it (leading
    NaNs by the first value, as nothing earlier exists)."""
    out = values.copy()
    for c in range(values.shape[1]):
        known = np.flatnonzero(~np.isnan(values[:, c]))
        last = np.maximum.accumulate(np.where(np.isnan(values[:, c]), -1, np.arange(len(values))))
        out[:, c] = values[np.where(last < 0, known[0], last), c]
    return out


def windows(inputs: torch.Tensor, targets: torch.Tensor, ends: range, window: int,
            horizon: int) -> Split:
    """Inputs inputs[e - window + 1 .. e] and targets targets[e + 1 .. e + horizon] for
    every last-input index e in `ends`."""
    e = torch.tensor(list(ends), dtype=torch.int64)
    past = e[:, None] + torch.arange(-window + 1, 1)
    future = e[:, None] + torch.arange(1, horizon + 1)
    return Split(inputs[past].contiguous(), targets[future].contiguous())


def forecast_bundle(name: str, times: np.ndarray, values: np.ndarray, columns: list[str],
                    cfg) -> DataBundle:
    """Split the series chronologically, fill gaps per part, scale from train, cut windows."""
    n, w, h = len(times), cfg.window, cfg.horizon
    test_start = n - round(n * cfg.test_fraction)
    val_start = test_start - round(n * cfg.val_fraction)
    if cfg.season > w:
        raise DataError(f"data.window: {w} is shorter than data.season {cfg.season}; the "
                        f"seasonal-naive baseline needs a whole season of past values")
    if val_start < w + h:
        raise DataError(f"{name}: {val_start} training rows cannot hold one window of "
                        f"data.window + data.horizon = {w + h} rows")
    bounds = {"train": (0, val_start), "val": (val_start, test_start), "test": (test_start, n)}
    gaps = {part: int(np.isnan(values[a:b]).sum()) for part, (a, b) in bounds.items()}
    interpolated = np.concatenate([interpolate(times[a:b], values[a:b], columns, f"{name} {part}")
                                   for part, (a, b) in bounds.items() if b > a])
    targets = torch.from_numpy(interpolated).to(torch.float32)
    inputs = torch.from_numpy(carry_forward(values)).to(torch.float32)

    train_rows = targets[:val_start].double()
    mean = tuple(float(f"{v:.6g}") for v in train_rows.mean(0))
    std = tuple(float(f"{v:.6g}") for v in train_rows.std(0).clamp_min(1e-6))
    splits = {"train": windows(inputs, targets, range(w - 1, val_start - h), w, h)}
    for part in ("val", "test"):
        a, b = bounds[part]
        if b - a >= h:   # targets inside the part; inputs may reach back into earlier parts
            splits[part] = windows(inputs, targets, range(a - 1, b - h), w, h)
    if "test" not in splits:
        raise DataError(f"data.test_fraction: the last {n - test_start} rows hold no test "
                        f"window of data.horizon = {h} steps")
    c = len(columns)
    info = DataInfo(name=name, task="forecast", inputs="sequence", shape=(w, c),
                    target_shape=(h, c), mean=mean, std=std, target_mean=mean, target_std=std,
                    target_channels=tuple(range(c)), season=cfg.season, columns=tuple(columns))
    total = sum(gaps.values())
    notes = [f"{name}: {total} empty cell(s) (train {gaps['train']}, val {gaps['val']}, test "
             f"{gaps['test']}): as targets interpolated linearly within their part, as "
             f"inputs the last value observed before them"] if total else []
    return DataBundle(info=info, train=splits["train"], test=splits["test"],
                      val=splits.get("val"), notes=notes, facts={"gaps_interpolated": gaps})


@source("csv", CsvData)
def load_csv(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return a forecasting bundle from data.path (CSV with a header row): data.columns
    are both the model's input channels and its targets."""
    if cfg.path is None:
        raise DataError("data.path: required for csv (a CSV file with a header row)")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path: {path} not found")
    if not cfg.columns:
        raise DataError("data.columns: name at least one column to forecast, e.g. "
                        "data.columns=[a,b]")
    times, values, _ = read_table(path, cfg.time_column, cfg.columns)
    return forecast_bundle(f"csv:{path.stem}", times, values, list(cfg.columns), cfg)


@source("co2", Forecasting)
def load_co2(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return the embedded weekly Mauna Loa CO2 series (ppm), 1958-03-29 to 2001-12-29,
    2284 weeks of which 59 have no measurement (Scripps / CDIAC, public domain; see
    deqctl/data/embedded/README.md)."""
    path = EMBEDDED / "co2" / "co2.csv"
    if not path.is_file():
        raise DataError(f"embedded co2 missing from {path}; reinstall deqctl")
    times, values, _ = read_table(path, "date", ["co2"])
    return forecast_bundle("co2", times, values, ["co2"], cfg)
