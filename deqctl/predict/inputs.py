"""What `deqctl predict` is given, read the way training read its data: image files
(single files, folders searched recursively, globs), `.npz` files holding `x`, and CSV
series for a forecaster. Each input becomes an Item (one model input, named), or a Failed
naming it with the reason; one bad input never stops the others.

Hostile inputs stay bounded: a folder or glob is walked within MAX_ENTRIES entries, each
real folder once (a symlink loop is not followed round); a CSV is streamed, keeping only
the rows the model's window needs, and a line longer than MAX_CSV_LINE is refused before
it is split; a file whose name is not UTF-8 is a bad input, as no row could name it."""

from __future__ import annotations

import csv
import glob
import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch

from ..data import DataError, DataInfo
from ..data.arrays import FLOAT32_MAX, check_finite, input_tensor, read_npz
from ..data.images import IMAGE_SUFFIXES, open_image, pixels
from ..data.series import carry_forward, parse_time
from ..errors import quote
from ..files import FileRefused, files_below, glob_paths, open_regular
from .times import STAMPS_READ, continue_times, row_numbers

# folder entries a folder or glob input may look through: a dataset's test images are
# far fewer; /proc or a whole disk is not an input
MAX_ENTRIES = 1_000_000
# bytes on one CSV line: thousands of columns; a longer line is refused unsplit, since
# splitting a line into cells costs ~30x its size
MAX_CSV_LINE = 256 * 2**10


@dataclass
class Item:
    """One model input: `x` as a split holds it (uint8 (C, H, W) pixels, float (L, C)
    values), named by `name`; a forecast's `times` label the steps ahead."""

    name: str
    x: torch.Tensor
    times: list[str] | None = None


@dataclass
class Failed:
    """An input that could not be read or does not fit the model; its name printable
    (bytes that are not UTF-8 shown escaped, as \\xff)."""

    name: str
    reason: str

    def __post_init__(self) -> None:
        self.name = shown(self.name)


def shown(name: str) -> str:
    """`name` as text that can be printed and written: the bytes of a file name that is
    not UTF-8 (which Python holds as lone surrogates) written escaped, as \\xff."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class _ImageFile:
    """An image found but not yet decoded: pixels are read one file at a time, when its
    batch comes, so a folder of large photos never sits in memory at full size."""

    name: str
    path: Path


@dataclass
class Reader:
    """How a trained model's inputs are read: `info` describes what it was trained on,
    `layout` is its recipe's data.layout (npz), `time_column` the CSV time column (None:
    the first column that is not a value column), `every` a forecast at every window
    rather than after the last one; `any_length` the model takes sequences of any length."""

    info: DataInfo
    layout: str = "auto"
    time_column: str | None = None
    every: bool = False
    any_length: bool = False

    def read(self, args: list[str]) -> "Inputs":
        """Every input `args` name, in order: a folder's images sorted by their path
        under it, a glob's matches sorted."""
        found = Inputs(self, [])
        for arg in args:
            found.entries.extend(self._entries(arg, found.files))
        return found

    # -- finding inputs -----------------------------------------------------------------
    def _entries(self, arg: str, files: list[Path]) -> list[Item | Failed | _ImageFile]:
        path = Path(arg).expanduser()
        if path.is_dir():
            try:
                found = sorted((p for p in files_below(path, MAX_ENTRIES)
                                if p.suffix.lower() in IMAGE_SUFFIXES),
                               key=lambda p: p.relative_to(path).parts)
            except FileRefused as exc:
                return [Failed(arg, str(exc))]
            if not found:
                return [Failed(arg, "a folder without image files (.png, .jpg, ...)")]
            return [e for p in found
                    for e in self._file(p, p.relative_to(path).as_posix(), files)]
        if not path.exists() and glob.has_magic(arg):
            try:
                matches = glob_paths(str(path), MAX_ENTRIES)
            except FileRefused as exc:
                return [Failed(arg, str(exc))]
            if not matches:
                return [Failed(arg, "no file matches this pattern")]
            return [e for m in matches for e in self._entries(m, files)]
        if not path.exists() and not path.is_symlink():
            return [Failed(arg, "not found")]
        return self._file(path, arg, files)

    def _file(self, path: Path, name: str, files: list[Path]
              ) -> list[Item | Failed | _ImageFile]:
        """The entries of one file: an npz's rows, a CSV's windows, or the image."""
        files.append(path)
        if shown(name) != name:
            return [Failed(name, "the file name is not valid UTF-8, so no row could name "
                                 "it; rename the file")]
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return self._npz(path, name)
        if suffix == ".csv":
            return self._csv(path, name)
        if self.info.inputs != "image":
            return [Failed(name, f"a {self.info.inputs} model reads .npz files"
                                 f"{' or CSV series' if self.info.task == 'forecast' else ''}"
                                 f", not {suffix or 'files without a suffix'}")]
        return [_ImageFile(name, path)]

    # -- reading each kind ----------------------------------------------------------------
    def image(self, entry: _ImageFile) -> Item | Failed:
        """The pixels of an image file converted as training converted its data: to the
        model's colour mode, resized bilinearly to its size."""
        c, h, w = self.info.shape
        if c not in (1, 3):
            return Failed(entry.name, f"the model takes {c}-channel images, which image "
                                      f"files do not hold; give an .npz")
        try:
            with open_image(entry.path) as im:
                im.load()
                x = pixels(im, "L" if c == 1 else "RGB", (w, h))
        except DataError as exc:
            return Failed(entry.name, _reason(str(exc), entry.path))
        except OSError as exc:                      # a truncated file shows only at load()
            return Failed(entry.name, f"not a readable image ({type(exc).__name__})")
        return Item(entry.name, torch.from_numpy(x))

    def _npz(self, path: Path, name: str) -> list[Item | Failed]:
        try:
            arrays = read_npz(path)
            if "x" not in arrays:
                raise DataError(f"no array x (has: {', '.join(arrays) or 'none'})")
            check_finite(arrays["x"], "x", name)
            x, kind = input_tensor(arrays["x"], "x", self.layout)
        except DataError as exc:
            return [Failed(name, _reason(str(exc), path))]
        problem = self._misfit(kind, tuple(x.shape[1:]))
        if problem:
            return [Failed(name, f"x holds {problem}")]
        return [Item(f"{name}[{i}]", x[i]) for i in range(x.shape[0])]

    def _csv(self, path: Path, name: str) -> list[Item | Failed]:
        info = self.info
        if info.task != "forecast" or info.inputs != "sequence":
            return [Failed(name, f"CSV series are read by forecasters; this is a "
                                 f"{info.task} model of {info.inputs}s")]
        if not info.columns:
            return [Failed(name, "the model was trained on arrays, so its channels have no "
                                 "column names; give an .npz")]
        window, horizon = info.length, info.target_shape[0]
        try:
            series = read_series(path, list(info.columns), self.time_column,
                                 None if self.every else max(window, STAMPS_READ))
        except (DataError, FileRefused) as exc:
            return [Failed(name, _reason(str(exc), path))]
        values, stamps, rows = series.values, series.stamps, series.rows
        empty = [c for c, col in zip(info.columns, values.T) if np.isnan(col).all()]
        if empty:
            return [Failed(name, f"column {', '.join(empty)} holds no values")]
        if rows < window:
            return [Failed(name, f"{rows} rows; the model reads windows of {window}")]
        x = torch.from_numpy(carry_forward(values)).to(torch.float32)
        try:
            later = continue_times(stamps, horizon) if stamps else row_numbers(rows, horizon)
        except ValueError as exc:
            return [Failed(name, f"{series.time_column}: {exc}")]
        stamps = (stamps or row_numbers(rows - len(values), len(values))) + later
        ends = range(window - 1, len(values)) if self.every else [len(values) - 1]
        return [Item(f"{name}@{stamps[e]}" if self.every else name, x[e - window + 1:e + 1],
                     stamps[e + 1:e + 1 + horizon]) for e in ends]

    def _misfit(self, kind: str, shape: tuple[int, ...]) -> str | None:
        """How inputs of `kind` shaped `shape` do not fit the model, or None."""
        info = self.info
        want = info.shape
        if kind != info.inputs:
            return f"{kind}s shaped {shape}; the model takes {info.inputs}s shaped {want}"
        fits = shape == want or (self.any_length and kind == "sequence"
                                 and shape[1:] == want[1:])
        if not fits:
            return (f"samples shaped {shape}; the model takes {want}"
                    f"{' (any length)' if self.any_length and kind == 'sequence' else ''}")
        return None


@dataclass
class Inputs:
    """The inputs found, in order; iterating decodes image files as it goes."""

    reader: Reader
    entries: list[Item | Failed | _ImageFile]
    files: list[Path] = field(default_factory=list)     # every file named, read or not

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Item | Failed]:
        for e in self.entries:
            yield self.reader.image(e) if isinstance(e, _ImageFile) else e


@dataclass
class Series:
    """The end of a CSV series as a forecaster reads it: `values` (rows kept, C) in time
    order, NaN for a gap (a gap in the first row kept holds the last value before it, so
    carrying values forward gives what it gives on the whole series), the time column's
    text per row kept (None without a time column), and the rows the file holds."""

    values: np.ndarray
    stamps: list[str] | None
    rows: int
    time_column: str | None


def read_series(path: Path, columns: list[str], time_column: str | None,
                keep: int | None) -> Series:
    """The last `keep` rows by time (every row for None) of a CSV with a header row,
    streamed: memory grows with `keep` and MAX_CSV_LINE, never with the file. Rows are
    sorted by `time_column` (None: the first header column that is not one of `columns`;
    without one, file order). DataError (one line) for a line over MAX_CSV_LINE bytes, a
    missing column, a time or value that is no number, or two kept rows at one time."""
    with open_regular(path) as raw:
        reader = csv.reader(_lines(raw))
        try:
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise DataError("empty, or no header on its first line")
            time_column = time_column or next((h for h in header if h not in columns), None)
            wanted = ([time_column] if time_column else []) + columns
            missing = [c for c in wanted if c not in header]
            if missing:
                raise DataError(f"no column {', '.join(map(quote, missing))} (columns: "
                                f"{quote(', '.join(header))})")
            index = [header.index(c) for c in wanted]
            tail = _Tail(keep, len(columns))
            for row in reader:
                if any(cell.strip() for cell in row):          # else a blank line
                    tail.add(reader.line_num, *_parse(row, index, time_column, columns,
                                                      reader.line_num, tail.rows))
        except UnicodeDecodeError:
            raise DataError("not UTF-8 text") from None
        except csv.Error as exc:
            raise DataError(f"not a readable CSV ({str(exc)[:80]})") from None
    if not tail.rows:
        raise DataError("a header but no rows")
    values, stamps = tail.series(time_column)
    return Series(values, stamps if time_column else None, tail.rows, time_column)


def _lines(raw: BinaryIO) -> Iterator[str]:
    """The file's lines as text, refusing one over MAX_CSV_LINE bytes unread past that."""
    number = 0
    while line := raw.readline(MAX_CSV_LINE + 1):
        number += 1
        if len(line) > MAX_CSV_LINE:
            raise DataError(f"line {number} is longer than {MAX_CSV_LINE // 2**10} KB; a "
                            f"series has a time and its values on each line")
        yield line.decode("utf-8-sig" if number == 1 else "utf-8")


def _parse(row: list[str], index: list[int], time_column: str | None, columns: list[str],
           line: int, before: int) -> tuple[float, str, list[float]]:
    """(time, its text, values) of a CSV row; a row's time is its place without a time
    column. An empty cell is a gap (NaN); "nan" or "inf" written out is a wrong value."""
    cells = [row[i].strip() if i < len(row) else "" for i in index]
    stamp = ""
    if time_column:
        stamp = cells.pop(0)
        t = parse_time(stamp)
        if t is None or not math.isfinite(t):
            raise DataError(f"line {line}: time {quote(stamp)} is neither a number nor a date")
    else:
        t = float(before)
    values = []
    for c, cell in zip(columns, cells):
        try:
            v = float(cell) if cell else math.nan
        except ValueError:
            v = math.inf
        if cell and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX):
            raise DataError(f"line {line}: {c} = {quote(cell)} is not a finite float32 "
                            f"number (leave a cell empty for a gap)")
        values.append(v)
    return t, stamp, values


class _Tail:
    """The `keep` latest rows seen so far (a heap on (time, line)), and per column the
    latest value among the rows let go, for a gap at the start of those kept."""

    def __init__(self, keep: int | None, channels: int):
        self.keep, self.rows = keep, 0
        self.heap: list[tuple[float, int, str, list[float]]] = []
        self.before: list[tuple[float, int, float] | None] = [None] * channels

    def add(self, line: int, t: float, stamp: str, values: list[float]) -> None:
        self.rows += 1
        row = (t, line, stamp, values)
        if self.keep is None or len(self.heap) < self.keep:
            heapq.heappush(self.heap, row)
            return
        if row > self.heap[0]:
            row = heapq.heapreplace(self.heap, row)
        for c, v in enumerate(row[3]):                         # let go: remember its values
            if not math.isnan(v) and (self.before[c] is None or row[:2] > self.before[c][:2]):
                self.before[c] = (row[0], row[1], v)

    def series(self, time_column: str | None) -> tuple[np.ndarray, list[str]]:
        rows = sorted(self.heap)
        for a, b in zip(rows, rows[1:]):
            if time_column and a[0] == b[0]:
                raise DataError(f"lines {a[1]} and {b[1]} have the same {time_column} "
                                f"({quote(b[2])}); each time may appear once")
        values = np.array([r[3] for r in rows], dtype=np.float64)
        for c, held in enumerate(self.before):
            if held is not None and math.isnan(values[0, c]):
                values[0, c] = held[2]
        return values, [r[2] for r in rows]


def _reason(message: str, path: Path) -> str:
    """A data error's message without the `data.path: FILE` prefix it has in training
    (the row names the file already)."""
    for prefix in ("data.path: ", f"{path}: ", f"{path.name}: ", f"{path}"):
        message = message.removeprefix(prefix)
    return message.removeprefix(": ").strip() or "unreadable"
