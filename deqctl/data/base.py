"""The shapes data takes in deqctl: a description (DataInfo), splits of uint8 tensors, and
the bundle a loader returns. No file or network access here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch


class DataError(Exception):
    """A data problem a user can fix (unknown name, missing files); str() is one line."""


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data; all a checkpoint stores of it.

    mean/std are per channel, of pixels scaled to [0, 1]; the model normalises inside
    itself so that exported models take plain [0, 1] images.
    """

    name: str
    kind: str  # "image" (sequence data comes later)
    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (tuples become lists) that `from_dict` turns back."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        """Return the DataInfo stored by `as_dict` (unknown keys are ignored so that
        checkpoints written by a newer version still load)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["mean"], kwargs["std"] = tuple(kwargs["mean"]), tuple(kwargs["std"])
        return cls(**kwargs)


@dataclass
class Split:
    """One split held in memory: uint8 images (N, C, H, W) and int64 labels (N,).

    `natural` marks photographs (e.g. CIFAR-10): augmentation then also flips
    horizontally, which would turn digits into non-digits.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    natural: bool = False

    def __post_init__(self) -> None:
        # Fail at load time, not deep inside a training step, if a loader got a layout wrong.
        if self.inputs.dtype != torch.uint8 or self.inputs.dim() != 4:
            raise ValueError(f"Split.inputs must be uint8 (N, C, H, W), got "
                             f"{self.inputs.dtype} {tuple(self.inputs.shape)}")
        if self.targets.dtype != torch.int64 or self.targets.shape != self.inputs.shape[:1]:
            raise ValueError(f"Split.targets must be int64 ({self.inputs.shape[0]},), got "
                             f"{self.targets.dtype} {tuple(self.targets.shape)}")

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def head(self, n: int | None) -> Split:
        """Return the first `n` samples (all of them when n is None or larger)."""
        if n is None or n >= len(self):
            return self
        # clone: a view would keep the whole (possibly large) dataset alive
        return Split(self.inputs[:n].clone(), self.targets[:n].clone(), self.natural)


@dataclass
class DataBundle:
    """Everything `build_data` returns: the description and the splits (val may be None)."""

    info: DataInfo
    train: Split
    test: Split
    val: Split | None = None


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...],
                                                                    tuple[float, ...]]:
    """Return per-channel (mean, std) of uint8 images (N, C, H, W) scaled to [0, 1],
    rounded to 4 decimals.

    Exact integer sums over chunks: float32 sums drift on 50k images, and converting the
    whole set to float64 at once would take ~1 GB for CIFAR-10.
    """
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.int64)
    total_sq = torch.zeros(c, dtype=torch.int64)
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].to(torch.int64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.numel() // c
    mean = total.double() / count / 255.0
    var = (total_sq.double() / count / 255.0**2 - mean**2).clamp_min(0.0)
    # a constant image set has std 0; keep normalisation finite
    std = var.sqrt().clamp_min(1e-3)
    return (tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std))
