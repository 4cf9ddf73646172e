"""Text generation with a DEQ language model, token by token, reusing fixed points.

A causal cell's position t depends on positions <= t only, so appending a token leaves
every earlier position's fixed point where it was. With reuse, each new token's solve
therefore runs on the new position alone: its map is z_t -> cell([z*_<t, z_t], u)[t],
the earlier positions held at their fixed points, started where a cold solve starts it
(the model's init_state: measured on the Shakespeare model, 6.3 evaluations per token
against 7.4 from the previous token's fixed point).
Its residual is the new position's own, so its tolerance is no looser than the cold
start's, whose residual is over the whole window.

The context is the model's training length L (data.seq_len). When a token would make it
L + 1 long, the oldest tokens are dropped so that the newest L // 2 remain: every kept
token then sits at another position with less before it, so every fixed point moves, and
that window is solved whole, started from the kept tokens' previous fixed points. The
next L // 2 - 1 tokens are again appended one position at a time. Without reuse
(`reuse=False`) every token's window is solved from the cold start; both modes see the
same contexts, so they differ only in where each solve starts and what it solves.

With a readout stop (deq.eval.stop_mode kl or argmax) each token's solve also stops once
the next-token distribution (the last position's) has settled; `compare=True` solves each
token a second time on the residual alone, from the same start, and records its NFE and
whether its most likely next token is the same (the text continues from the first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.nn.utils import parametrize

from ..data import Tokenizer
from ..engine.device import autocast
from ..implicit import SolveSpec
from ..models import DEQModel

State = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class Token:
    """One generated token and the solve that gave the distribution it was drawn from."""

    id: int
    text: str
    nfe: int
    rel_residual: float
    converged: bool
    window: str          # "cold" (a whole window from the cold start), "slide", "append"
    # Generator(compare=True) with a readout stop: the residual-stopped solve of the same
    # token, its NFE and whether its most likely next token is the readout-stopped one's
    residual_nfe: int | None = None
    agrees: bool | None = None


@dataclass
class Sampler:
    """Next-token choice: greedy (argmax), or a draw at `temperature` from the `top_k`
    most likely tokens, from a generator seeded by `seed` (the same seed, the same text)."""

    temperature: float = 1.0
    top_k: int | None = None
    greedy: bool = False
    seed: int = 0
    _gen: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        logits = logits.float().cpu()
        if self.greedy or self.temperature == 0:
            return int(logits.argmax())
        if self.top_k is not None and self.top_k < logits.numel():
            kth = logits.topk(self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = (logits / self.temperature).softmax(-1)
        if not torch.isfinite(probs).all() and not logits.isnan().any():
            # T so small that logits / T overflowed (inf - inf in the softmax): at its
            # limit T -> 0 the draw is the most likely token, so take it (NaN logits, a
            # broken model, still fail in multinomial)
            return int(logits.argmax())
        return int(torch.multinomial(probs, 1, generator=self._gen))


class Generator:
    """Continues texts with `model` (a language model, eval mode, on `device`), solving
    with `solver` under the recipe's `precision`; `reuse` keeps fixed points across
    tokens where the cell is causal (model.time_axis) and solved to a fixed point."""

    def __init__(self, model: DEQModel, *, solver: SolveSpec, device: torch.device,
                 precision: str = "fp32", reuse: bool = True, compare: bool = False):
        self.model, self.solver, self.device, self.precision = model.eval(), solver, device, precision
        self.compare = compare and model.deq.readout_stop is not None
        self.tokenizer = Tokenizer.of(model.info)
        self.window = model.info.length
        self.keep = max(1, self.window // 2)
        self.axis = model.time_axis
        self.reuse = reuse and self.axis is not None and not model.deq.settings.fixed_depth

    def encode(self, prompt: str) -> tuple[list[int], int]:
        """(the prompt's token ids, how many characters are not in the vocabulary)."""
        ids = self.tokenizer.encode(prompt)
        return ids.tolist(), self.tokenizer.unknown_in(ids)

    def generate(self, prompt: list[int], tokens: int, sample: Callable[[torch.Tensor], int]
                 ) -> Iterator[Token]:
        """Yield `tokens` tokens continuing `prompt` (its last L ids are the first context)."""
        context, z, how = list(prompt[-self.window:]), None, "cold"
        text_of = self.tokenizer.stream(prompt)   # a character split over tokens comes whole
        for _ in range(tokens):
            token, z, res, ref = self._next(context, z, how, sample)
            text = text_of(token)
            yield Token(token, text, res.nfe, float(res.rel_residual[0]),
                        bool(res.converged[0]), how, *ref)
            context.append(token)
            how = "append"
            if len(context) > self.window:
                context, how = context[-self.keep:], "slide"
                # the fixed points of the last `keep` old positions: _solve starts the kept
                # tokens from theirs (all but the oldest) and the new one afresh
                z = _take(z, slice(-self.keep, None), self.axis) if self.reuse else None
            if not self.reuse:
                z, how = None, "cold"

    def _next(self, context: list[int], z: State | None, how: str, sample):
        """(the next token, the context's fixed point, its solve's statistics, and with
        `compare` the residual-stopped solve's NFE and agreement, else (None, None))."""
        with torch.inference_mode(), parametrize.cached(), autocast(self.device, self.precision):
            x = torch.tensor([context], device=self.device)
            u = self.model.inject(x)
            z_new, res = self._solve(u, z, how, x, readout=True)
            logits = self.model.decode(z_new, x)[0, -1]
            ref = (None, None)
            if self.compare:
                z_ref, ref_res = self._solve(u, z, how, x, readout=False)
                same = self.model.decode(z_ref, x)[0, -1].argmax() == logits.argmax()
                ref = (ref_res.nfe, bool(same))
            return sample(logits), z_new, res, ref

    def _solve(self, u: torch.Tensor, z: State | None, how: str,
               x: torch.Tensor | None = None, readout: bool = False):
        """The fixed point of the whole context, and the solve's statistics; with
        `readout`, stopped on the next token's distribution if the eval settings say so."""
        m, a = self.model, self.axis
        if z is None:
            return self._fixed_point(m.cell, u, m.init_state(u), x, None, readout)
        fresh = _take(m.init_state(u), slice(-1, None), a)      # the new position's start
        if how == "slide":        # kept tokens moved: solve the whole window from where they were
            return self._fixed_point(m.cell, u, _cat(_take(z, slice(1, None), a), fresh, a),
                                     x, None, readout)
        prefix = z

        def new_position(z_t: State, u_t: torch.Tensor) -> State:
            return _take(m.cell(_cat(prefix, z_t, a), u_t), slice(-1, None), a)

        z_t, res = self._fixed_point(new_position, u, fresh, x, prefix, readout)
        return _cat(prefix, z_t, a), res

    def _fixed_point(self, cell, u: torch.Tensor, z0: State, x: torch.Tensor | None,
                     prefix: State | None, readout: bool):
        """Solve `cell` from z0 (the whole window, or after `prefix` the new position)."""
        m, a = self.model, self.axis

        def next_token(z: State, idx=None) -> torch.Tensor:
            # one context at a time: the batch is 1, and idx (compact) can only keep it
            return m.readout_log_probs(z if prefix is None else _cat(prefix, z, a), x)[:, -1]

        use = readout and m.deq.readout_stop is not None
        z, info = m.deq(cell, u, z0, solver=self.solver, readout=next_token if use else None)
        return z, info.forward


def _take(z: State, index: slice, axis: int) -> State:
    if isinstance(z, tuple):
        return tuple(_take(t, index, axis) for t in z)
    return z[(slice(None),) * axis + (index,)]


def _cat(a: State, b: State, axis: int) -> State:
    if isinstance(a, tuple):
        return tuple(torch.cat([x, y], dim=axis) for x, y in zip(a, b))
    return torch.cat([a, b], dim=axis)


@dataclass
class Summary:
    """Per-token solve statistics of a generation, as mean and max, and its speed."""

    tokens: int
    seconds: float
    nfe_mean: float
    nfe_max: int
    rel_residual_mean: float
    rel_residual_max: float
    converged: float

    @classmethod
    def of(cls, tokens: list[Token], seconds: float) -> "Summary":
        n = max(1, len(tokens))
        return cls(len(tokens), seconds, sum(t.nfe for t in tokens) / n,
                   max((t.nfe for t in tokens), default=0),
                   sum(t.rel_residual for t in tokens) / n,
                   max((t.rel_residual for t in tokens), default=0.0),
                   sum(t.converged for t in tokens) / n)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

