"""The settings blocks data sources share: the keys every source takes, and the families
of sources (images, text, forecasts). Each source's own block lives in its module."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator

from ..options import Block, Bool, Float, Int


class DataBase(Block):
    """Keys every data source takes (and keeps when data.name switches source)."""

    batch_size: Int = Field(64, ge=1)
    eval_batch_size: Int = Field(500, ge=1)
    limit_train: Int | None = Field(None, ge=1, description="use only the first N training samples")
    limit_eval: Int | None = Field(None, ge=1, description="use only the first N eval samples")


class Augmentable(DataBase):
    augment: Bool = Field(False, description="random shifts (+ flips for natural images); "
                          "images only (imagenet: image folders and hf images)")


def _augment(value: Any) -> Any:
    if not isinstance(value, bool) and value != "imagenet":
        raise ValueError(f"expected true, false or imagenet, got {str(value)[:80]!r}")
    return value


# true/false as before, or "imagenet": RandomResizedCrop + flip, Resize + CenterCrop to evaluate
Augment = Annotated[bool | Literal["imagenet"], BeforeValidator(_augment)]


class DecodedImages(Augmentable):
    """Images decoded as they are used (image folders, hf image sets): worker processes,
    and the per-sample ImageNet augmentation."""

    augment: Augment = Field(False, description="true: random shifts (+ flips for colour); "
                             "imagenet: RandomResizedCrop(image_size) + flip, and Resize + "
                             "CenterCrop to evaluate")
    workers: Int = Field(0, ge=0, le=256, description="DataLoader worker processes that decode "
                         "images (0: in the main process)")


class TextTokens(DataBase):
    tokenizer: str = Field("char", min_length=1, max_length=4096, description=
                           "char | byte | word | bpe | a path to a tokenizer.json")
    vocab_size: Int = Field(8192, ge=257, le=2**24, description="bpe: ids to learn (the 256 "
                            "bytes included)")
    bpe_sample_mb: Float | None = Field(256, gt=0, description="bpe: fit on about this many "
                                        "MB of the training text, taken evenly across it "
                                        "(null: all of it); every token is still encoded")
    min_freq: Int = Field(1, ge=1, description="word: rarer words read as <unk>")
    max_size: Int | None = Field(None, ge=1, description="word: keep the most frequent words")
    root: str | None = Field(None, description="cache folder: token files (and downloads); "
                             "default $DEQCTL_CACHE, else ~/.cache/deqctl")

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, value: str) -> str:
        if value not in ("char", "byte", "word", "bpe") and not value.endswith(".json"):
            raise ValueError("expected char, byte, word, bpe or a path to a tokenizer.json")
        return value
    seq_len: Int = Field(128, ge=2, description="tokens per training sequence (context length)")


class Forecasting(DataBase):
    window: Int = Field(104, ge=2, description="past steps the model sees")
    horizon: Int = Field(52, ge=1, description="future steps it predicts")
    season: Int = Field(52, ge=1, description="period of the seasonal-naive baseline")
    val_fraction: Float = Field(0.0, ge=0, lt=1, description="chronological, before test")
    test_fraction: Float = Field(0.2, gt=0, lt=1, description="the last part of the series")


class ArraysData(Augmentable):
    """What arrays (an .npz file, or a user's data function) are read with."""

    layout: Literal["auto", "sequence", "image"] = Field(
        "auto", description="how to read a 3-d float x: (N, L, C) sequences (auto) or "
        "(N, H, W) images")
