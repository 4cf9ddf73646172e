"""What `deqctl predict` is given, read the way training read its data: image files
(single files, folders searched recursively, globs), `.npz` files holding `x`, and CSV
series for a forecaster. Each input becomes an Item (one model input, named), or a Failed
naming it with the reason; one bad input never stops the others."""

from __future__ import annotations

import csv
import glob
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..data import DataError, DataInfo
from ..data.arrays import check_finite, input_tensor, read_npz
from ..data.images import IMAGE_SUFFIXES, open_image, pixels
from ..data.series import carry_forward, read_table
from ..files import FileRefused, open_regular
from .times import continue_times, row_numbers


@dataclass
class Item:
    """One model input: `x` as a split holds it (uint8 (C, H, W) pixels, float (L, C)
    values), named by `name`; a forecast's `times` label the steps ahead."""

    name: str
    x: torch.Tensor
    times: list[str] | None = None


@dataclass
class Failed:
    """An input that could not be read or does not fit the model."""

    name: str
    reason: str


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
        entries: list[Item | Failed | _ImageFile] = []
        for arg in args:
            entries.extend(self._entries(arg))
        return Inputs(self, entries)

    # -- finding inputs -----------------------------------------------------------------
    def _entries(self, arg: str) -> list[Item | Failed | _ImageFile]:
        path = Path(arg).expanduser()
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                            and p.is_file()), key=lambda p: p.relative_to(path).parts)
            if not found:
                return [Failed(arg, "a folder without image files (.png, .jpg, ...)")]
            return [e for p in found for e in self._file(p, p.relative_to(path).as_posix())]
        if not path.exists() and glob.has_magic(arg):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                return [Failed(arg, "no file matches this pattern")]
            return [e for m in matches for e in self._entries(m)]
        if not path.exists() and not path.is_symlink():
            return [Failed(arg, "not found")]
        return self._file(path, arg)

    def _file(self, path: Path, name: str) -> list[Item | Failed | _ImageFile]:
        """The entries of one file: an npz's rows, a CSV's windows, or the image."""
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
        columns = list(info.columns)
        try:
            time_column = self.time_column or _first_other_column(path, columns)
            _, values, stamps = read_table(path, time_column, columns)
        except (DataError, FileRefused) as exc:
            return [Failed(name, _reason(str(exc), path))]
        empty = [c for c, col in zip(columns, values.T) if np.isnan(col).all()]
        window, horizon = info.length, info.target_shape[0]
        if empty:
            return [Failed(name, f"column {', '.join(empty)} holds no values")]
        if len(values) < window:
            return [Failed(name, f"{len(values)} rows; the model reads windows of {window}")]
        x = torch.from_numpy(carry_forward(values)).to(torch.float32)
        try:
            later = (continue_times(stamps, horizon) if stamps
                     else row_numbers(len(values), horizon))
        except ValueError as exc:
            return [Failed(name, f"{time_column}: {exc}")]
        stamps = (stamps or row_numbers(0, len(values))) + later
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

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Item | Failed]:
        for e in self.entries:
            yield self.reader.image(e) if isinstance(e, _ImageFile) else e


def _first_other_column(path: Path, columns: list[str]) -> str | None:
    """The CSV's first header column that is not a value column: its time column, by
    the convention of tables like co2.csv (date, co2); None when there is none."""
    with open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
        try:
            header = next(csv.reader(fh), [])
        except (csv.Error, UnicodeDecodeError):
            return None                  # read_table says what is wrong with the file
    return next((h.strip() for h in header if h.strip() not in columns), None)


def _reason(message: str, path: Path) -> str:
    """A data error's message without the `data.path: FILE` prefix it has in training
    (the row names the file already)."""
    for prefix in ("data.path: ", f"{path}: ", f"{path.name}: ", f"{path}"):
        message = message.removeprefix(prefix)
    return message.removeprefix(": ").strip() or "unreadable"
