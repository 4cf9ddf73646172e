"""What a model's output means for the task: the one place where classifiers (accuracy)
and language models (bits per character / perplexity) part ways.

Everything downstream (eval tables, JSON, sweeps, export parity, input names) asks here,
so a new kind of data changes this module only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

CLASSIFIER_KINDS = ("image",)


def is_classifier(data_info: dict[str, Any]) -> bool:
    """Return True when the model predicts one class per input (accuracy is reported)."""
    return data_info.get("kind", "image") in CLASSIFIER_KINDS


def quality_names(data_info: dict[str, Any]) -> tuple[str, ...]:
    """Return the names of the task metrics reported next to the loss."""
    return ("accuracy",) if is_classifier(data_info) else ("bpc", "ppl")


def quality_metrics(row: dict[str, Any], data_info: dict[str, Any]) -> dict[str, float]:
    """Return the task metrics of an evaluation row (mean cross-entropy in nats in "loss").

    Classifiers: {"accuracy"}. Language models: {"bpc", "ppl"}, both derived from the
    per-token loss: bpc = loss / ln 2, ppl = exp(loss).
    """
    if is_classifier(data_info):
        return {"accuracy": float(row.get("accuracy", float("nan")))}
    loss = float(row["loss"])
    ppl = math.exp(loss) if loss < 700 else float("inf")   # exp overflows past ~709
    return {"bpc": loss / math.log(2.0), "ppl": ppl}


def predictions(out: torch.Tensor) -> torch.Tensor:
    """Return the predicted class (or next token) per output: argmax over the last axis."""
    return out.argmax(dim=-1)


def input_name(data_info: dict[str, Any]) -> str:
    """Return the name exported graphs give their input ("images" or "tokens")."""
    return "images" if data_info.get("kind", "image") == "image" else "tokens"


def input_description(data_info: dict[str, Any]) -> str:
    """Return what the model (and every exported artefact) takes as input, for messages."""
    if data_info.get("kind", "image") == "image":
        return (f"float32 in [0, 1] shaped (N, {data_info['channels']}, {data_info['height']}, "
                f"{data_info['width']})")
    return "int64 token ids shaped (N, L)"
