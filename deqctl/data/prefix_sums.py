"""`prefix-sums`: generated bit strings whose label at every position is the running parity
(the cumulative sum of the bits so far, mod 2), the easy-to-hard task of Schwarzschild et
al. 2021 ("Can you learn an algorithm?") and Anil et al. 2022 ("Path independent
equilibrium models can better exploit test-time computation"): train on short strings,
test on longer ones, where a model that iterates to an answer may need more iterations.

Nothing is downloaded or read: each split is a pure function of (data.seed, split), drawn
with its own NumPy generator, so train, val and test never share a stream and changing one
split's size or length leaves the others as they were. Train and val strings are
`data.length` bits, test strings `data.test_length`. The bits are tokens of the `char`
vocabulary "01" (id 1 is the bit 0, id 2 the bit 1; id 0, the char tokenizer's unknown
character, never occurs), so every token model reads them; the targets are classes 0 / 1
per position (task `tag`).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ..options import Int
from .base import DataBundle, DataError, DataInfo, Split
from .registry import source
from .settings import DataBase

VOCAB = "01"                       # the char vocabulary: bit b is token id b + 1
MAX_LENGTH = 65_536                # bits per string
MAX_TOKENS = 2**26                 # bits per split (int64 inputs and targets: 1 GiB)
_STREAMS = {"train": 0, "val": 1, "test": 2}


class PrefixSumsData(DataBase):
    """Generated bit strings labelled with their running parity."""

    length: Int = Field(32, ge=1, le=MAX_LENGTH, description="bits per train and val string")
    test_length: Int = Field(64, ge=1, le=MAX_LENGTH, description="bits per test string "
                             "(longer than length: harder than training)")
    train_size: Int = Field(10_000, ge=1, description="training strings")
    val_size: Int = Field(1_000, ge=0, description="val strings, at the training length "
                          "(0: no val split)")
    test_size: Int = Field(1_000, ge=1, description="test strings, at test_length")
    seed: Int = Field(0, ge=0, description="the strings are a pure function of it")


def bit_strings(seed: int, split: str, n: int, length: int) -> np.ndarray:
    """Return `n` uniformly random bit strings (int64 (n, length) of 0 and 1) of `split`,
    the same for the same arguments on every machine (NumPy's PCG64, seeded by (seed,
    split))."""
    rng = np.random.default_rng([seed, _STREAMS[split]])
    return rng.integers(0, 2, size=(n, length), dtype=np.int64)


def running_parity(bits: np.ndarray) -> np.ndarray:
    """Return the parity of bits[..., :t + 1] at every position t (int64, 0 or 1)."""
    return np.bitwise_and(np.cumsum(bits, axis=-1), 1)


def _split(cfg, part: str, n: int, length: int) -> Split:
    key = "data.test_length" if part == "test" else "data.length"
    if n * length > MAX_TOKENS:
        size = f"data.{part}_size"
        raise DataError(f"{key}: {n:,} strings of {length:,} bits ({size}) is more than "
                        f"{MAX_TOKENS:,} bits in one split; lower {size} or {key}")
    bits = bit_strings(cfg.seed, part, n, length)
    return Split(torch.from_numpy(bits + 1), torch.from_numpy(running_parity(bits)))


@source("prefix-sums", PrefixSumsData)
def load_prefix_sums(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return data.train_size and data.val_size strings of data.length bits and
    data.test_size of data.test_length bits, each labelled at every position with the
    running parity (task `tag`, 2 classes per position)."""
    train = _split(cfg, "train", cfg.train_size, cfg.length)
    val = _split(cfg, "val", cfg.val_size, cfg.length) if cfg.val_size else None
    test = _split(cfg, "test", cfg.test_size, cfg.test_length)
    info = DataInfo(name="prefix-sums", task="tag", inputs="tokens", shape=(cfg.length,),
                    num_classes=2, classes=("0", "1"), tokenizer="char", vocab=VOCAB)
    lengths = {"train": cfg.length, "test": cfg.test_length,
               **({"val": cfg.length} if val is not None else {})}
    return DataBundle(info=info, train=train, test=test, val=val,
                      facts={"string_length": lengths})
