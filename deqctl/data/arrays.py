"""Arrays from a NumPy .npz file: x, y, x_test, y_test (optional x_val, y_val).

What x holds decides the inputs: float (N, L) or (N, L, C) are sequences, (N, C, H, W)
(or (N, H, W) with data.layout=image) images; uint8 (N, H, W) or (N, C, H, W) are images.
What y holds decides the task: integers are classes, floats are values to predict.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from zipfile import BadZipFile, ZipFile

import numpy as np
import torch

from ..files import FileRefused, open_regular
from ..options import parameters
from .base import DataBundle, DataError, DataInfo, Split, channel_stats
from .registry import source
from .settings import ArraysData


MAX_CLASSES = 100_000      # a label beyond this is a mistake, and would size the head


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz, once their headers show they fit in memory."""
    try:
        with open_regular(path) as fh:
            _check_size(path, fh)
            fh.seek(0)
            with np.load(fh, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
    except FileRefused as exc:
        raise DataError(f"data.path: {exc}") from None
    except (BadZipFile, OSError, ValueError, EOFError, AttributeError, RuntimeError,
            NotImplementedError) as exc:
        # RuntimeError, NotImplementedError: encrypted or oddly compressed members
        # ValueError: object arrays, which would need unpickling: never done
        # AttributeError: a lone .npy, which np.load returns as an array
        raise DataError(f"data.path: {path} is not a readable .npz of plain arrays "
                        f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None


def _check_size(path: Path, fh) -> None:
    """DataError when the arrays, as their headers describe them, need more memory than
    is available (with the float32 copy made of them): a small file of zeros can expand
    to gigabytes, and would be loaded before anything else could object."""
    arrays = []                          # (bytes, name, shape)
    with ZipFile(fh) as zf:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            with zf.open(info) as member:      # numpy reads any member with the magic
                if member.read(6) != np.lib.format.MAGIC_PREFIX:
                    arrays.append((info.file_size, name, (info.file_size,)))
                    continue
                version = tuple(member.read(2))
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(member)
            arrays.append((math.prod(shape) * dtype.itemsize, name, shape))
    need = 2 * sum(size for size, _, _ in arrays)     # the arrays, and the tensors made of them
    available = available_memory()
    if arrays and available is not None and need > available:
        _, name, shape = max(arrays)
        raise DataError(f"data.path: {path.name} needs about {need / 2**30:.1f} GB in memory "
                        f"({name} alone is {shape}), more than the {available / 2**30:.1f} GB "
                        f"available")


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux MemAvailable), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
    """The index of the first True of `mask`, as plain ints."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_finite(a: np.ndarray, key: str, where: str) -> None:
    """DataError naming the first value that is not finite in float32 (a finite float64
    beyond float32's range would become inf in training)."""
    if a.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(a) | (np.abs(a) > FLOAT32_MAX)
        if bad.any():
            raise DataError(f"{where}: {key} holds NaN, inf or values beyond float32 "
                            f"({int(bad.sum())} value(s), the first at index "
                            f"{_first_bad(bad)}); fill or drop them first")


def input_tensor(x: np.ndarray, key: str, layout: str) -> tuple[torch.Tensor, str]:
    """Return (x as a tensor in deqctl's layout, "image" | "sequence")."""
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{key}: no samples (shape {x.shape})")
    if 0 in x.shape[1:]:
        raise DataError(f"{key}: shape {x.shape} holds samples of length 0")
    if x.dtype == np.uint8:
        if x.ndim not in (3, 4) or layout == "sequence":
            raise DataError(f"{key}: uint8 arrays are images, (N, H, W) or (N, C, H, W); "
                            f"got {x.shape}")
        t = torch.from_numpy(np.ascontiguousarray(x))
        return (t.unsqueeze(1) if x.ndim == 3 else t), "image"
    if x.dtype.kind != "f":
        raise DataError(f"{key}: expected float (or uint8 image) values, got {x.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.ndim == 2 and layout != "image":
        return t.unsqueeze(2), "sequence"
    if x.ndim == 3:
        return (t.unsqueeze(1), "image") if layout == "image" else (t, "sequence")
    if x.ndim == 4 and layout != "sequence":
        return t, "image"
    raise DataError(f"{key}: shape {x.shape} with data.layout={layout} is neither a sequence "
                    f"(N, L) / (N, L, C) nor an image (N, C, H, W)")


def _targets(y: np.ndarray, key: str, n: int) -> torch.Tensor:
    if y.ndim == 0 or y.shape[:1] != (n,):
        raise DataError(f"{key}: {y.shape[0] if y.ndim else 0} samples, its x has {n}")
    if y.dtype.kind in "iu":
        if y.ndim != 1:
            raise DataError(f"{key}: integer labels must be (N,), got {y.shape}")
        bad = (y < 0) | (y >= MAX_CLASSES)
        if bad.any():
            i = _first_bad(bad)[0]
            raise DataError(f"{key}: label {int(y[i])} at index {i} is out of range (class "
                            f"labels are 0, 1, ... below {MAX_CLASSES})")
        return torch.from_numpy(y.astype(np.int64))
    if y.dtype.kind == "f":
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    raise DataError(f"{key}: expected integer classes or float values, got {y.dtype}")


class NpzData(ArraysData):
    """data.path: arrays x, y, x_test, y_test (optional x_val, y_val)."""

    path: str | None = None


@source("npz", NpzData)
def load_npz(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return the arrays of data.path as a classification or regression bundle; scaling
    statistics come from the training part."""
    if cfg.path is None:
        raise DataError("data.path: required for npz (x, y, x_test, y_test arrays)")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path: {path} not found")
    return arrays_bundle(read_npz(path), f"npz:{path.stem}", path.name, cfg, like)


def arrays_bundle(arrays: dict[str, np.ndarray], name: str, where: str, cfg,
                  like: DataInfo | None) -> DataBundle:
    """The bundle of arrays x, y, x_test, y_test (optional x_val, y_val), read per
    cfg.layout; `where` names their origin in errors."""
    missing = [k for k in ("x", "y", "x_test", "y_test") if k not in arrays]
    if ("x_val" in arrays) != ("y_val" in arrays):
        missing.append("y_val" if "x_val" in arrays else "x_val")
    if missing:
        raise DataError(f"{where} lacks array(s) {', '.join(missing)} "
                        f"(has: {', '.join(arrays) or 'none'})")
    splits, kind = {}, None
    for part, suffix in (("train", ""), ("test", "_test"), ("val", "_val")):
        if f"x{suffix}" not in arrays:
            continue
        for key in (f"x{suffix}", f"y{suffix}"):
            check_finite(arrays[key], key, where)
        x, this = input_tensor(arrays[f"x{suffix}"], f"x{suffix}", cfg.layout)
        y = _targets(arrays[f"y{suffix}"], f"y{suffix}", x.shape[0])
        if splits and (this != kind or x.shape[1:] != splits["train"].inputs.shape[1:]):
            raise DataError(f"x{suffix}: shape {tuple(x.shape)} does not match x "
                            f"{tuple(splits['train'].inputs.shape)}")
        if splits and (y.dtype != splits["train"].targets.dtype
                       or y.shape[1:] != splits["train"].targets.shape[1:]):
            raise DataError(f"y{suffix}: {y.dtype} {tuple(y.shape)} does not match y "
                            f"{splits['train'].targets.dtype} {tuple(splits['train'].targets.shape)}")
        if cfg.augment and this != "image":
            raise DataError("data.augment: shifts apply to images; this x holds sequences")
        splits[part], kind = Split(x, y, augment="shift" if this == "image" else None), this
    return _bundle(name, splits, kind, like)


def function_source(fn, ref: str):
    """The loader of a user's data function: its options are its keyword arguments, and
    it returns the arrays an .npz would hold (NumPy arrays or tensors)."""
    def load(cfg, like: DataInfo | None = None) -> DataBundle:
        options = {p.name: getattr(cfg, p.name) for p in parameters(fn, 0)}
        arrays = fn(**options)       # what it raises is reported as the user's code's
        if not isinstance(arrays, dict) or not all(isinstance(k, str) for k in arrays):
            raise DataError(f"data.name={ref}: the data function must return a dict of "
                            f"arrays (x, y, x_test, y_test), got {type(arrays).__name__}")
        arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                  for k, v in arrays.items()}
        return arrays_bundle(arrays, ref.rpartition(":")[2], f"data.name={ref}", cfg, like)
    return load


def _bundle(name: str, splits: dict[str, Split], kind: str, like: DataInfo | None) -> DataBundle:
    train = splits["train"]
    x, y = train.inputs, train.targets
    mean, std = channel_stats(x, dim=1 if kind == "image" else 2)
    common = dict(name=name, inputs=kind, shape=tuple(x.shape[1:]), mean=mean, std=std)
    if y.dtype == torch.int64:
        classes = int(max(s.targets.max() for s in splits.values())) + 1
        if like is not None and like.num_classes is not None:
            if classes > like.num_classes:
                raise DataError(f"y: class {classes - 1} is beyond the model's "
                                f"{like.num_classes} classes")
            classes = like.num_classes     # a test set need not hold every class
        info = DataInfo(task="classify", num_classes=classes, **common)
    else:
        # values per target channel: the last axis of (N, H, C) targets, else one channel
        t_mean, t_std = channel_stats(y.unsqueeze(-1) if y.dim() < 3 else y, dim=-1)
        target_shape = tuple(y.shape[1:])
        # the targets continue the input series when they have its channels (naive
        # baselines then exist: last value, and the same with season 1)
        c = x.shape[-1]
        continues = kind == "sequence" and (target_shape[-1:] == (c,) and len(target_shape) == 2
                                            or (c == 1 and len(target_shape) == 1))
        info = DataInfo(task="forecast", target_shape=target_shape, target_mean=t_mean,
                        target_std=t_std, target_channels=tuple(range(c)) if continues else None,
                        season=1 if continues else None, **common)
    return DataBundle(info=info, train=train, test=splits["test"], val=splits.get("val"))
