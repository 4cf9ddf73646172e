"""The shapes data takes in deqctl: a description (DataInfo), splits held in memory, and
the bundle a loader returns. No file or network access here.

Inputs come in three kinds, each with its dtypes:
- image:    uint8 (N, C, H, W) pixels (batches arrive as float in [0, 1]) or float (N, C, H, W)
- tokens:   int64 (N, L) token ids
- sequence: float (N, L, C) values, or uint8 (N, L, C) pixels (sequential MNIST)
Targets are int64 (N,) classes, int64 (N, L) next tokens, int64 (N, L) classes per
position (tag), or float (N, ...) values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..errors import quote

TASKS = ("classify", "lm", "forecast", "tag")
INPUTS = ("image", "tokens", "sequence")


class DataError(Exception):
    """A data problem a user can fix (unknown name, missing files); str() is one line."""


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data; all a checkpoint stores of it.

    mean/std are per input channel (images: of pixels scaled to [0, 1]); target_mean /
    target_std per target channel (forecast). Models normalise inside themselves, so
    exported models take the data's raw inputs and return outputs in the data's units.
    """

    name: str
    task: str                                   # classify | lm | forecast | tag
    inputs: str                                 # image | tokens | sequence
    shape: tuple[int, ...]                      # one input: (C, H, W) | (L,) | (L, C)
    num_classes: int | None = None              # classify, tag (classes per position)
    classes: tuple[str, ...] = ()               # classify, tag: class i's name (i when unnamed)
    tokenizer: str | None = None                # lm: "char" | "byte" | "word" | "bpe" | "file"
    vocab: str | None = None                    # char: id i + 1 is vocab[i], 0 unknown;
                                                # word, bpe, file: the tokenizer.json
    target_shape: tuple[int, ...] = ()          # forecast: one target, e.g. (horizon, channels)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    target_mean: tuple[float, ...] = ()
    target_std: tuple[float, ...] = ()
    target_channels: tuple[int, ...] | None = None   # forecast: input channels the targets
    season: int | None = None                        # continue (naive baselines), season
    columns: tuple[str, ...] = ()               # names of a sequence's channels (csv)

    def __post_init__(self) -> None:
        if self.task not in TASKS or self.inputs not in INPUTS:
            raise ValueError(f"DataInfo: task {quote(self.task)} / inputs {quote(self.inputs)} unknown")

    @property
    def channels(self) -> int:
        """Input channels: C of an image or a sequence, 1 for tokens."""
        return {"image": self.shape[0], "sequence": self.shape[-1]}.get(self.inputs, 1)

    @property
    def length(self) -> int | None:
        """Sequence length L of token and sequence inputs (None for images)."""
        return None if self.inputs == "image" else self.shape[0]

    @property
    def vocab_size(self) -> int | None:
        """Number of token ids (lm), the unknown id 0 included for char vocabularies."""
        if self.tokenizer == "byte":
            return 256
        if self.vocab is None:
            return None
        from .tokenize import of      # tokenizers is imported only for data that needs it

        return of(self.tokenizer, self.vocab).size

    @property
    def input_name(self) -> str:
        """What exported graphs call their input: "images", "tokens" or "series"."""
        return {"image": "images", "tokens": "tokens", "sequence": "series"}[self.inputs]

    def describe_inputs(self) -> str:
        """What the model (and every exported artefact) takes as input, for messages."""
        if self.inputs == "image":
            return f"float32 in [0, 1] shaped (N, {', '.join(map(str, self.shape))})"
        if self.inputs == "tokens":
            return f"int64 token ids shaped (N, L), L = {self.shape[0]} in training"
        return f"float32 values shaped (N, {self.shape[0]}, {self.shape[1]}) in the data's units"

    def class_name(self, i: int) -> str:
        """The name training gave class `i`: an image folder's subfolder, a dataset's label
        name, else the index itself."""
        return self.classes[i] if i < len(self.classes) else str(i)

    @property
    def baselines(self) -> bool:
        """True when naive and seasonal-naive forecasts exist (the targets continue input
        channels)."""
        return self.target_channels is not None and self.season is not None

    def fits(self, other: DataInfo) -> list[str]:
        """Return how data described by `other` differs from this in what a model built for
        this one depends on (empty when it can feed that model)."""
        keys = ("task", "inputs", "shape", "num_classes", "tokenizer", "vocab", "target_shape")
        diff = [f"{k} {quote(getattr(other, k))} vs {quote(getattr(self, k))}" for k in keys
                if getattr(self, k) != getattr(other, k)]
        if self.columns and other.columns and self.columns != other.columns:
            diff.append(f"columns {list(other.columns)} vs {list(self.columns)} (the channels "
                        f"must come in the order the model learned)")
        return diff

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (tuples become lists) that `from_dict` turns back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        """Return the DataInfo stored by `as_dict`. Unknown keys are ignored so that
        checkpoints written by a newer version still load; image descriptions written before
        sequence data existed (kind/channels/height/width) are read too."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a mapping, got {type(d).__name__}")
        if "task" not in d and d.get("kind") == "image":
            d = {**d, "task": "classify", "inputs": "image",
                 "shape": [d.get("channels"), d.get("height"), d.get("width")]}
        missing = [k for k in ("name", "task", "inputs", "shape") if k not in d]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        kwargs = {}
        for k, v in d.items():
            if k in _FIELD_CHECKS:
                check, what = _FIELD_CHECKS[k]
                v = tuple(v) if isinstance(v, list) else v
                if not check(v):
                    raise ValueError(f"{k} must be {what}, got {quote(v)}")
                kwargs[k] = tuple(float(x) for x in v) if k in _FLOATS else v
        info = cls(**kwargs)
        problems = info._inconsistent()
        if problems:
            raise ValueError("; ".join(problems))
        return info

    def _inconsistent(self) -> list[str]:
        """How a stored description contradicts itself (statistics of another number of
        channels, a baseline that reads beyond the window), which would fail only later."""
        out = []
        targets = self.target_shape[-1] if len(self.target_shape) >= 2 else 1
        for name, n in (("mean", self.channels), ("std", self.channels),
                        ("target_mean", targets), ("target_std", targets)):
            values = getattr(self, name)
            if values and len(values) != n:
                out.append(f"{name} has {len(values)} values for {n} channel(s)")
        if any(v <= 0 for v in (*self.std, *self.target_std)):
            out.append("std holds values <= 0")
        if self.target_channels is not None and (
                any(c >= self.channels for c in self.target_channels)
                or len(self.target_channels) != targets):
            out.append(f"target_channels {list(self.target_channels)} do not fit "
                       f"{self.channels} input channel(s) and {targets} target channel(s)")
        if self.season is not None and (self.length is None or self.season > self.length):
            out.append(f"season {self.season} is longer than the window {self.length}")
        if self.task in ("classify", "tag") and self.num_classes is None:
            out.append(f"a {self.task} description needs num_classes")
        if self.classes and len(self.classes) != self.num_classes:
            out.append(f"{len(self.classes)} class names for {self.num_classes} classes")
        if self.task == "lm" and self.vocab_size is None:
            out.append("a language model's description needs its tokenizer and vocab")
        elif self.inputs == "tokens" and self.vocab_size is None:
            out.append("token inputs need their tokenizer and vocab")
        return out


def _ints(low: int):
    return lambda v: isinstance(v, tuple) and len(v) <= 8 and all(
        isinstance(i, int) and not isinstance(i, bool) and low <= i < 2**31 for i in v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 2**31


def _floats(v: Any) -> bool:
    return isinstance(v, tuple) and len(v) <= 2**16 and all(
        isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) for f in v)


def _optional(check):
    return lambda v: v is None or check(v)


_FLOATS = ("mean", "std", "target_mean", "target_std")

# What a stored description may hold (it comes from a file someone may have sent): the
# check and what it expects, per field.
_FIELD_CHECKS = {
    "name": (lambda v: isinstance(v, str) and len(v) <= 1000, "a string"),
    "task": (lambda v: v in TASKS, f"one of {', '.join(TASKS)}"),
    "inputs": (lambda v: v in INPUTS, f"one of {', '.join(INPUTS)}"),
    "shape": (lambda v: _ints(1)(v) and 1 <= len(v) <= 3, "1 to 3 sizes >= 1"),
    "num_classes": (_optional(_count), "a count >= 1"),
    "classes": (lambda v: isinstance(v, tuple) and len(v) <= 100_000 and all(
        isinstance(c, str) and len(c) <= 200 for c in v), "class names"),
    "tokenizer": (lambda v: v in (None, "char", "byte", "word", "bpe", "file"),
                  "char, byte, word, bpe or file"),
    "vocab": (lambda v: v is None or (isinstance(v, str) and 0 < len(v) <= 2**26),
              "the vocabulary's characters or a tokenizer.json"),
    "target_shape": (_ints(1), "sizes >= 1"),
    "mean": (_floats, "finite numbers"),
    "std": (_floats, "finite numbers"),
    "target_mean": (_floats, "finite numbers"),
    "target_std": (_floats, "finite numbers"),
    "target_channels": (_optional(_ints(0)), "channel indices"),
    "season": (_optional(_count), "a count >= 1"),
    "columns": (lambda v: isinstance(v, tuple) and all(isinstance(c, str) for c in v),
                "column names"),
}


@dataclass
class Split:
    """One split: `inputs` and `targets`, first dimension the samples; tensors in memory,
    or rows of a token file read as they are indexed (deqctl.data.tokens.TokenWindows).

    `augment` names the augmentation batches of this split may get: "shift" (random
    translation of the last two axes: digits, sequential digits) or "shift+flip"
    (photographs); None when augmentation means nothing for the data.

    `per_token` holds what one token of a text split is in its raw text, e.g.
    {"bytes_per_token": 4.4, "words_per_token": 0.83}: the divisors of a language model's
    bits per byte and word perplexity (empty for other data).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    augment: str | None = None
    per_token: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Fail at load time, not deep inside a training step, if a loader got a layout wrong.
        x, y = self.inputs, self.targets
        if x.dtype not in (torch.uint8, torch.float32, torch.int64) or x.dim() < 2:
            raise ValueError(f"Split.inputs must be uint8, float32 or int64 with a sample "
                             f"axis, got {x.dtype} {tuple(x.shape)}")
        if y.dtype not in (torch.int64, torch.float32) or y.shape[:1] != x.shape[:1]:
            raise ValueError(f"Split.targets must be int64 or float32 ({x.shape[0]}, ...), "
                             f"got {y.dtype} {tuple(y.shape)}")

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def head(self, n: int | None) -> Split:
        """Return the first `n` samples (all of them when n is None or larger)."""
        if n is None or n >= len(self):
            return self
        part = self.rows(slice(0, n))
        # clone: a view would keep the whole (possibly large) dataset alive; rows of a
        # token file are read only as they are used, so theirs stay a view
        keep = (lambda a: a.clone() if isinstance(a, torch.Tensor) else a)
        return replace(self, inputs=keep(part.inputs), targets=keep(part.targets))

    def rows(self, part: slice) -> Split:
        """Return samples `part` as a view: nothing copied, nothing read."""
        view = (lambda a: a[part] if isinstance(a, torch.Tensor) else a.rows_view(part))
        return replace(self, inputs=view(self.inputs), targets=view(self.targets))


@dataclass
class DataBundle:
    """Everything `build_data` returns: the description, the splits (val may be None;
    train too when a trained model is evaluated on data without a training part), notes
    for the user (e.g. gaps interpolated) and the same as numbers in `facts` (e.g.
    {"unknown_tokens": {"test": 12}}), which evaluation reports."""

    info: DataInfo
    train: Split | None
    test: Split
    val: Split | None = None
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Split:
        """Return "train", "val" or "test"; DataError when the data has no such split."""
        found = getattr(self, name, None) if name in ("train", "val", "test") else None
        if found is None:
            raise DataError(f"{self.info.name} has no {name} split (it has: "
                            f"{', '.join(n for n in ('train', 'val', 'test') if getattr(self, n) is not None)})")
        return found


def channel_stats(x: torch.Tensor, dim: int = 1, chunk: int = 4096
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return per-channel (mean, std) of `x` along channel axis `dim`, rounded to 4
    significant digits; uint8 pixels are scaled to [0, 1] first.

    uint8: exact integer sums over chunks (float32 sums drift on 50k images, and
    converting CIFAR-10 to float64 at once would take ~1 GB). Float: float64 over chunks.
    """
    c = x.shape[dim]
    x = x.movedim(dim, -1)
    exact = x.dtype == torch.uint8
    acc = torch.int64 if exact else torch.float64
    total = torch.zeros(c, dtype=acc)
    total_sq = torch.zeros(c, dtype=acc)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].reshape(-1, c).to(acc)
        total += part.sum(0)
        total_sq += (part * part).sum(0)
    count = x.numel() // c
    scale = 255.0 if exact else 1.0
    mean = total.double() / count / scale
    var = (total_sq.double() / count / scale**2 - mean**2).clamp_min(0.0)
    # a constant channel has std 0; keep normalisation finite
    std = var.sqrt().clamp_min(1e-3 if exact else 1e-6)
    return (tuple(float(f"{v:.4g}") for v in mean), tuple(float(f"{v:.4g}") for v in std))
