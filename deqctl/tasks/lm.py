"""`lm`: next-token prediction at every position. The loss is cross-entropy in nats per
token; the metrics say it in units that compare across tokenizers:

- `ppl`: perplexity per token (per word for `word` tokens, the WikiText-103 figure);
- `bpc`: bits per character, for `char` and `byte` tokens (loss / ln 2);
- `bpb`: bits per UTF-8 byte of the split's raw text (bits per token / bytes per token);
- `word_ppl`: perplexity per word of the raw text (runs of non-whitespace and line ends,
  as the `word` tokenizer counts them), for subword tokens: exp(loss / words per token).

The last two need what one token is in the raw text (data.Split.per_token, from the
token file; `eval --json` shows the counts under "data"); data without it (token arrays
from a user's function) reports `ppl` and `bpc` alone. The headline is `bpc` for characters
and bytes, `ppl` for words and `bpb` for subwords.

A model's output is next-token logits (N, L, V) (or log-probabilities: the same loss), or,
from an adaptive softmax while training or evaluating, an object whose `nll(y)` is that
loss computed from the targets without the (N, L, V) tensor (models/adaptive.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import DataInfo
from ..ui.fmt import fmt_float
from .base import Metric, Task

PPL = Metric("ppl", "ppl", fmt_float)
BPC = Metric("bpc", "bpc", fmt_float)
BPB = Metric("bpb", "bpb", fmt_float)
WORD_PPL = Metric("word_ppl", "word ppl", fmt_float)


def _exp(nats: float) -> float:
    return math.exp(nats) if nats < 700 else math.inf     # exp overflows past ~709


class LanguageModel(Task):
    name = "lm"
    output_name = "logits"
    metrics = (BPC, PPL, BPB, WORD_PPL)

    def __init__(self, info: DataInfo):
        super().__init__(info)
        self.metrics = {"word": (PPL, BPB), "bpe": (BPB, PPL, WORD_PPL),
                        "file": (BPB, PPL, WORD_PPL), "byte": (BPC, PPL)}.get(
                            info.tokenizer, (BPC, PPL, BPB))

    def loss(self, out, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            return out.nll(y)
        return F.cross_entropy(out.float().flatten(0, -2), y.flatten())

    def finish(self, row, split=None):
        loss = row.get("loss")
        if loss is None or not math.isfinite(loss):
            return row
        per_token = split.per_token if split is not None else {}
        values = {"ppl": _exp(loss), "bpc": loss / math.log(2.0)}
        if per_token.get("bytes_per_token"):
            values["bpb"] = values["bpc"] / per_token["bytes_per_token"]
        if per_token.get("words_per_token"):
            values["word_ppl"] = _exp(loss / per_token["words_per_token"])
        row.update({m.key: values[m.key] for m in self.metrics if m.key in values})
        return row

    def log_probs(self, out) -> torch.Tensor:
        return super().log_probs(_scores(out))

    def agree(self, a, b):
        return _scores(a).argmax(dim=-1) == _scores(b).argmax(dim=-1)


def _scores(out) -> torch.Tensor:
    """Scores over the vocabulary: an adaptive softmax's lazy output makes its full
    log-probabilities on request."""
    return out if isinstance(out, torch.Tensor) else out.log_probs()
