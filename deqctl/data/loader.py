"""Images decoded as they are used: a split of image files (or Hugging Face rows) holds
references, never pixels, and each batch is decoded in `DataLoader` worker processes
(data.workers; 0 decodes in the main process).

Determinism: the batches to read (sample order, this rank's slice) are planned in the main
process by deqctl.data.batches; a worker turns one planned batch into pixels, and every
random choice of a sample (ImageNet's crop and flip) comes from a generator seeded by
(seed, epoch, the sample's index). So a batch is the same whichever worker decodes it, with
any number of workers, and from any start position (a resume mid-epoch is bit-exact).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .base import DataError
from .images import open_image, pixels

WORKER_TIMEOUT_S = 300   # a batch no worker delivers in this long: a hung worker, stop
STATS_SAMPLE = 5000      # images the channel mean/std are computed over (evenly spaced)
_SAMPLE = 2              # generator stream of per-sample augmentation (batches: 0, 1)
_BILINEAR = 2
_PR_SET_PDEATHSIG = 1    # prctl(2)


# --- references ----------------------------------------------------------------------


class PathList:
    """File paths held as one bytes blob and offsets: a million Python path objects would
    cost ~150 MB, and forked workers touching their reference counts copy those pages."""

    def __init__(self, paths: Sequence[Path]):
        encoded = [os.fsencode(p) for p in paths]
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ends)

    def name(self, i: int) -> str:
        lo = int(self.ends[i - 1]) if i else 0
        return os.fsdecode(self.blob[lo:int(self.ends[i])].tobytes())

    def open(self, i: int):
        return open_image(Path(self.name(i)))


class HfRows:
    """Rows of a Hugging Face dataset's image column, read undecoded (bytes or a path)."""

    def __init__(self, dataset, column: str, where: str):
        from datasets import Image as HfImage

        self.rows = dataset.select_columns([column]).cast_column(column, HfImage(decode=False))
        self.column, self.where = column, where

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, i: int) -> str:
        return f"{self.where} row {i}"

    @contextlib.contextmanager
    def open(self, i: int):
        from PIL import Image

        value = self.rows[int(i)][self.column] or {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
                with Image.open(source) as im:
                    yield im
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise DataError(f"{self.name(i)}: an image of more than {Image.MAX_IMAGE_PIXELS} "
                            f"pixels; resize it first") from None
        except (OSError, TypeError, ValueError) as exc:
            raise DataError(f"{self.name(i)}: not a readable image "
                            f"({exc.__class__.__name__})") from None


def headers(refs) -> tuple[set[str], tuple[int, int] | None, tuple[int, tuple[int, int]] | None]:
    """(colour modes, first image's (width, height), first (index, size) that differs):
    read from headers only, no pixels decoded."""
    modes, first, odd = set(), None, None
    for i in range(len(refs)):
        with refs.open(i) as im:
            modes.add(im.mode)
            first = first or im.size
            if odd is None and im.size != first:
                odd = (i, im.size)
    return modes, first, odd


# --- decoding one sample -------------------------------------------------------------


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=g))


def crop_box(w: int, h: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box: 8%..100% of the area, aspect 3/4..4/3 (log-uniform), ten
    tries, then the centre crop of the nearest allowed aspect."""
    for _ in range(10):
        area = w * h * _uniform(g, 0.08, 1.0)
        ratio = math.exp(_uniform(g, math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            y0 = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            return x0, y0, x0 + cw, y0 + ch
    cw, ch = (w, round(w * 4 / 3)) if w / h < 3 / 4 else \
        (round(h * 4 / 3), h) if w / h > 4 / 3 else (w, h)
    cw, ch = min(cw, w), min(ch, h)
    return (w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch


def centre_box(w: int, h: int, size: int) -> tuple[float, float, float, float]:
    """Resize(size * 256/224) of the shorter side, then CenterCrop(size), as one box of
    the original image (one resampling pass instead of two)."""
    side = min(w, h) * size / int(size * 256 / 224)
    return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2


def _decode_one(refs, ref: int, mode: str, size: tuple[int, int] | None, how: str,
                g: torch.Generator | None) -> np.ndarray:
    """One image as uint8 (C, H, W): `how` is "resize" (to `size`, today's in-memory
    semantics), "train" (RandomResizedCrop + flip, random from `g`) or "eval"
    (Resize + CenterCrop)."""
    with refs.open(ref) as im:
        try:
            im.load()
        except OSError as exc:         # a truncated file shows only now
            raise DataError(f"{refs.name(ref)}: not a readable image "
                            f"({exc.__class__.__name__})") from None
        if how == "resize":
            return pixels(im, mode, size)
        im = im.convert(mode)
        if how == "train":
            flip = float(torch.rand(1, generator=g)) < 0.5
            im = im.resize(size, resample=_BILINEAR, box=crop_box(*im.size, g))
            if flip:
                im = im.transpose(0)   # FLIP_LEFT_RIGHT
        else:
            im = im.resize(size, resample=_BILINEAR, box=centre_box(*im.size, size[0]))
        a = np.array(im, dtype=np.uint8)
        return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))


# --- the split's inputs ----------------------------------------------------------------


class ImageFiles:
    """The inputs of an image split, read as they are used: row i is image refs[rows[i]],
    decoded to uint8 (C, H, W) at `size` (width, height). Indexing decodes (evaluation's
    transform); `rows_view` selects rows without reading; `decode_batches` is the fast
    path, through worker processes."""

    dtype = torch.uint8

    def __init__(self, refs, mode: str, size: tuple[int, int], imagenet: bool, workers: int,
                 rows: range | None = None):
        self.refs, self.mode, self.size = refs, mode, size
        self.imagenet, self.workers = imagenet, workers
        self.rows = rows if rows is not None else range(len(refs))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), 1 if self.mode == "L" else 3,
                           self.size[1], self.size[0]))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, i: int) -> str:
        """The file (or dataset row) of sample i."""
        return self.refs.name(self.rows[i])

    def rows_view(self, part: slice) -> ImageFiles:
        """Rows `part` of these, still unread."""
        return ImageFiles(self.refs, self.mode, self.size, self.imagenet, self.workers,
                          self.rows[part])

    def __getitem__(self, index) -> torch.Tensor:
        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        single = isinstance(index, int)
        at = np.arange(len(self.rows))[index] if isinstance(index, slice) else \
            np.asarray(index, dtype=np.int64).reshape(-1)
        x = self.decode(torch.as_tensor(at), augment=None)
        x = x[0] if single else x
        return x[rest] if rest else x

    def decode(self, positions: torch.Tensor, augment: tuple[int, int] | None) -> torch.Tensor:
        """Samples `positions` as one uint8 batch; `augment` = (seed, epoch) draws
        ImageNet's training crops (sample i's from (seed, epoch, i)), None evaluates.
        Raises DataError naming a file that cannot be decoded."""
        how = "resize" if not self.imagenet else "train" if augment else "eval"
        out = []
        for p in positions.tolist():
            g = None
            if how == "train":
                from .batches import _generator
                g = _generator(_SAMPLE, augment[0], augment[1], p)
            out.append(_decode_one(self.refs, self.rows[p], self.mode, self.size, how, g))
        return torch.from_numpy(np.stack(out))

    def decode_batches(self, plan: Sequence[torch.Tensor], augment: tuple[int, int] | None,
                       pin: bool) -> Iterator[torch.Tensor]:
        """The batches of `plan` (each a tensor of positions), in order, decoded by
        data.workers processes (or here when 0); memory pinned when `pin` (CUDA)."""
        if self.workers == 0:
            for positions in plan:
                x = self.decode(positions, augment)
                yield x.pin_memory() if pin else x
            return
        # a generator of its own: the workers' base seed (nothing here draws from it) would
        # otherwise come from the global RNG, and the epoch a resume starts again would
        # draw it twice, shifting every later dropout mask and Jacobian probe
        batches = torch.utils.data.DataLoader(
            _Planned(self, augment), sampler=plan, batch_size=None,
            num_workers=self.workers, pin_memory=pin, timeout=WORKER_TIMEOUT_S,
            worker_init_fn=functools.partial(_start_worker, os.getpid()),
            persistent_workers=False, generator=torch.Generator())
        it = iter(batches)
        for _ in range(len(plan)):
            try:
                x = next(it)
            except RuntimeError as exc:        # killed, or silent past the timeout
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                raise DataError(f"data.workers: a data loader worker failed ({why}); "
                                f"try data.workers=0 to see the cause") from None
            if isinstance(x, str):             # the worker's DataError, one line
                raise DataError(x)
            yield x


class _Planned(torch.utils.data.Dataset):
    """A worker's view: item = one planned batch (a tensor of positions) -> its pixels,
    or the one-line message of the DataError that stopped it."""

    def __init__(self, files: ImageFiles, augment: tuple[int, int] | None):
        self.files, self.augment = files, augment

    def __getitem__(self, positions: torch.Tensor):
        try:
            return self.files.decode(positions, self.augment)
        except DataError as exc:      # a worker's exception would come back as a traceback
            return str(exc)


def _start_worker(parent: int, _: int) -> None:
    """Each worker dies with the process that started it (Linux): one left behind by a
    SIGKILL holds that process's open files (the run's lock: its resume is refused) until
    torch's watchdog looks, up to 5 s later. Each decodes with one thread: the main
    process's torch threads and the workers share the cores (see
    deqctl.engine.device.budget_threads)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):       # no prctl: the watchdog
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:                 # it died before the line above
            os._exit(0)
    torch.set_num_threads(1)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


# --- statistics ----------------------------------------------------------------------


def image_stats(files: ImageFiles, sample: int = STATS_SAMPLE, batch: int = 64
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of pixels in [0, 1] over at most `sample` images spread
    evenly over the split (all of a smaller one: then exactly deqctl.data.channel_stats
    of the decoded split), resized to the split's size, streamed through the workers."""
    n = len(files)
    picks = torch.arange(n) if n <= sample else \
        torch.linspace(0, n - 1, sample, dtype=torch.float64).round().long().unique()
    plain = ImageFiles(files.refs, files.mode, files.size, False, files.workers, files.rows)
    c = files.shape[1]
    total = torch.zeros(c, dtype=torch.int64)
    total_sq = torch.zeros(c, dtype=torch.int64)
    for x in plain.decode_batches(list(picks.split(batch)), None, pin=False):
        part = x.movedim(1, -1).reshape(-1, c).to(torch.int64)
        total += part.sum(0)
        total_sq += (part * part).sum(0)
    # the same arithmetic as channel_stats, so a small folder's statistics are unchanged
    count = len(picks) * files.shape[2] * files.shape[3]
    mean = total.double() / count / 255.0
    var = (total_sq.double() / count / 255.0**2 - mean**2).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-3)
    return (tuple(float(f"{v:.4g}") for v in mean), tuple(float(f"{v:.4g}") for v in std))
