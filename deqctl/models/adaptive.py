"""Adaptive input embedding and adaptive softmax (Baevski & Auli 2019; Grave et al. 2017)
for language models over large vocabularies, chosen by the `model.adaptive` option.

Word ids are ordered by frequency (deqctl.data.tokenize), so `cutoffs` [c1, c2, ...] split
the vocabulary into a head cluster [0, c1) of frequent words at the full width d and tail
clusters [c_i, c_i+1) at width d // div_val^i, each tail projected to and from d. The
softmax is torch's `nn.AdaptiveLogSoftmaxWithLoss` (its layout: `head` scores the shortlist
and one logit per tail cluster, `tail[i]` = Linear(d, d_i) then Linear(d_i, size_i)). With
`tie` the softmax reads the embedding's tensors, exactly: the shortlist's output rows are
the head cluster's embedding, each tail's output matrix is that cluster's embedding, and
each tail's projection is the transpose of the embedding's projection. Only the cluster
logits' rows and the head's bias are the softmax's own.

The (N, L, V) log-probabilities are what a full softmax would return, but at WikiText-103's
267k words they cost ~10 GB a training batch. So while training (and inside
`lazy_log_probs`, as evaluation is), the head returns `LazyLogProbs`: the features and the
head, whose `nll(y)` scores the targets directly; the lm task's loss asks for that.
Anything else (generate, export, predict) gets the full log-probabilities.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Annotated, Iterator

import torch
import torch.nn.functional as F
from annotated_types import Ge
from pydantic import Field
from torch import nn

from ..options import Block, Bool, Count, Float


class Adaptive(Block):
    """The `model.adaptive` option: adaptive input embedding and softmax."""

    cutoffs: list[Count] = Field(min_length=1, description="where the clusters of word ids "
                                 "start after the head cluster: increasing, below the "
                                 "vocabulary size (e.g. [20000, 40000, 200000])")
    div_val: Annotated[Float, Ge(1)] = Field(4.0, description="each cluster is div_val times "
                                             "narrower than the one before")
    tie: Bool = Field(True, description="the softmax reads the embedding's tensors")


def check(cfg: Adaptive, vocab: int, width: int) -> list[int]:
    """The clusters' widths [d, d // div_val, ...]; ValueError (one line, naming the key)
    for cutoffs that are not increasing and below `vocab`, or a cluster of width 0."""
    c = cfg.cutoffs
    if any(b <= a for a, b in zip(c, c[1:])) or c[-1] >= vocab:
        raise ValueError(f"model.adaptive.cutoffs={c}: must be increasing and below the "
                         f"vocabulary size ({vocab})")
    # torch's own rule for the tail widths, so the embedding's clusters tie to its tails
    widths = [width] + [int(width // cfg.div_val ** (i + 1)) for i in range(len(c))]
    if widths[-1] < 1:
        raise ValueError(f"model.adaptive.div_val={cfg.div_val:g}: the last of {len(c)} tail "
                         f"clusters would be {width} // {cfg.div_val:g}^{len(c)} = 0 wide; "
                         f"lower div_val or give fewer cutoffs")
    return widths


class AdaptiveEmbedding(nn.Module):
    """Token ids (N, L) -> (N, L, width): cluster i's words have d_i-wide vectors, projected
    to `width` (the head cluster's are already that wide); scaled by sqrt(width), so with
    N(0, 1/d_i) vectors and N(0, 1/width) projections the output, like nn.Embedding's, has
    unit variance, and tied output logits start at unit scale."""

    def __init__(self, vocab: int, width: int, cfg: Adaptive):
        super().__init__()
        widths = check(cfg, vocab, width)
        self.bounds = [0, *cfg.cutoffs, vocab]
        self.scale = math.sqrt(width)
        self.clusters = nn.ModuleList(nn.Embedding(hi - lo, w) for (lo, hi), w
                                      in zip(itertools.pairwise(self.bounds), widths))
        self.projections = nn.ModuleList(nn.Linear(w, width, bias=False) for w in widths[1:])
        for e, w in zip(self.clusters, widths):
            nn.init.normal_(e.weight, std=w ** -0.5)
        for p in self.projections:
            nn.init.normal_(p.weight, std=width ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # every cluster looks up every position (clamped) and keeps its own words: no
        # data-dependent shapes, so no host sync and an exportable graph; the lookups are
        # cheap next to the cell
        out = self.clusters[0](x.clamp(max=self.bounds[1] - 1))
        for i, (lo, hi) in enumerate(itertools.pairwise(self.bounds[1:])):
            e = self.projections[i](self.clusters[i + 1]((x - lo).clamp(0, hi - lo - 1)))
            out = torch.where(((x >= lo) & (x < hi)).unsqueeze(-1), e, out)
        return out * self.scale


class Borrowed(nn.Module):
    """A bias-free linear map whose weight is another module's parameter (or its
    transpose), read at every call and not registered here: a tied tensor is saved once,
    under its owner (safetensors refuses two names for one tensor)."""

    def __init__(self, owner: nn.Module, transpose: bool = False):
        super().__init__()
        self._owner = (owner,)           # a tuple: not a submodule, so not in state_dict
        self.transpose = transpose

    @property
    def weight(self) -> torch.Tensor:
        w = self._owner[0].weight
        return w.t() if self.transpose else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class TiedHead(nn.Module):
    """The softmax's head with its shortlist rows borrowed from the embedding's head
    cluster: weight = [embedding rows; one row per tail cluster], plus a bias."""

    def __init__(self, shortlist: nn.Embedding, n_clusters: int, width: int):
        super().__init__()
        self._shortlist = (shortlist,)
        self.clusters = nn.Parameter(torch.empty(n_clusters, width))
        self.bias = nn.Parameter(torch.zeros(shortlist.num_embeddings + n_clusters))
        nn.init.normal_(self.clusters, std=width ** -0.5)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self._shortlist[0].weight, self.clusters])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class AdaptiveSoftmax(nn.Module):
    """Features (..., width) -> next-token log-probabilities (..., vocab) in eval mode, or
    `LazyLogProbs` while training or inside `lazy_log_probs`; `nll(h, y)` the mean negative
    log-likelihood of targets y, computed cluster by cluster from the targets."""

    def __init__(self, width: int, vocab: int, cfg: Adaptive,
                 embedding: AdaptiveEmbedding | None = None):
        super().__init__()
        check(cfg, vocab, width)
        self.lazy = False
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(width, vocab, cfg.cutoffs,
                                                 div_value=cfg.div_val, head_bias=True)
        if embedding is not None:
            self.asm.head = TiedHead(embedding.clusters[0], len(cfg.cutoffs), width)
            for i, tail in enumerate(self.asm.tail):
                tail[0] = Borrowed(embedding.projections[i], transpose=True)
                tail[1] = Borrowed(embedding.clusters[i + 1])

    def forward(self, h: torch.Tensor) -> torch.Tensor | LazyLogProbs:
        if self.training or self.lazy:
            return LazyLogProbs(h, self)
        return self.log_probs(h)

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """All V log-probabilities of features h (..., width), in at least float32
        (softmaxes in float32 whatever autocast computed the logits in)."""
        asm, flat = self.asm, h.flatten(0, -2)
        head = _wide(asm.head(flat)).log_softmax(-1)
        parts = [head[:, :asm.shortlist_size]]
        for i, tail in enumerate(asm.tail):
            parts.append(_wide(tail(flat)).log_softmax(-1)
                         + head[:, asm.shortlist_size + i, None])
        return torch.cat(parts, -1).view(*h.shape[:-1], asm.n_classes)

    def nll(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean -log p(y | h) over all positions, without the full log-probabilities: the
        head for every position, each tail cluster only for the positions whose target is
        in it (one host sync per cluster, for its row count)."""
        asm, flat, y = self.asm, h.flatten(0, -2), y.flatten()
        short = asm.shortlist_size
        head = _wide(asm.head(flat)).log_softmax(-1)
        head_index, tail_lp = y, head.new_zeros(len(y))
        for i, (lo, hi) in enumerate(itertools.pairwise(asm.cutoffs)):
            inside = (y >= lo) & (y < hi)
            head_index = torch.where(inside, short + i, head_index)
            rows = inside.nonzero().squeeze(1)
            lp = _wide(asm.tail[i](flat.index_select(0, rows))).log_softmax(-1)
            tail_lp = tail_lp.index_add(0, rows, lp.gather(1, (y[rows] - lo)[:, None]).squeeze(1))
        return -(head.gather(1, head_index[:, None]).squeeze(1) + tail_lp).mean()


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for their softmax (autocast may have made them bf16)."""
    return logits.float() if logits.element_size() < 4 else logits


class LazyLogProbs:
    """An adaptive softmax's output before the log-probabilities are made: `nll(y)` is the
    training loss from the targets, `log_probs()` the full (..., V) tensor."""

    def __init__(self, h: torch.Tensor, head: AdaptiveSoftmax):
        self.h, self.head = h, head

    def nll(self, y: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of targets y (shaped like h without its last axis)."""
        return self.head.nll(self.h, y)

    def log_probs(self) -> torch.Tensor:
        """The full log-probabilities (..., V)."""
        return self.head.log_probs(self.h)

    def float(self) -> LazyLogProbs:
        """The same output from float32 features (as `Tensor.float` on logits)."""
        return LazyLogProbs(self.h.float(), self.head)

    @property
    def shape(self) -> torch.Size:
        return torch.Size([*self.h.shape[:-1], self.head.asm.n_classes])


@contextlib.contextmanager
def lazy_log_probs(model: nn.Module) -> Iterator[None]:
    """Within: every adaptive softmax of `model` returns LazyLogProbs in eval mode too, so
    an evaluation's loss never makes the full log-probabilities."""
    heads = [m for m in model.modules() if isinstance(m, AdaptiveSoftmax)]
    for m in heads:
        m.lazy = True
    try:
        yield
    finally:
        for m in heads:
            m.lazy = False
