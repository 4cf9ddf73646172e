"""What every DEQ model shares: input injection, a weight-tied cell, a decoder, and the
DEQ layer between them. Subclasses define `inject`, `cell`, `decode` (and `init_state`);
tools (eval, solve-trace, export) only use those four and so work for any model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..data import DataInfo
from ..implicit import DEQ, DEQInfo, SolveSpec
from ..implicit.cache import FixedPointCache


class ModelError(ValueError):
    """A recipe names a model that does not exist or does not fit the data."""


@dataclass
class ModelOutput:
    """Everything a training step needs from one forward pass."""

    out: torch.Tensor                                # the output at the fixed point
    info: DEQInfo
    corrections: list[tuple[float, torch.Tensor]]   # (weight, output) of earlier solver states


class DEQModel(nn.Module):
    """A DEQ model: z* = cell(z*, inject(x)), output = decode(z*, x).

    The contract a model by import path (`model.name: PATH.py:Class`) or entry point
    (group `deqctl.models`) keeps, like every built-in:
    - it subclasses `deqctl.DEQModel` and declares `inputs` (which DataInfo.inputs it
      reads: "image", "tokens", "sequence") and `tasks` ("classify", "lm", "forecast");
    - its constructor is `(info: deqctl.DataInfo, deq: deqctl.DEQ, **options)` and calls
      `super().__init__(info, deq)`: the recipe's other `model.*` keys are its options,
      validated against the signature and its annotations (deqctl.options has strict,
      constrained types: Count, Positive, Rate, Fraction);
    - it defines `inject(x) -> u` (once per forward pass), `cell(z, u) -> z` (the
      weight-tied map, a tensor or a tuple of tensors shaped like z), `decode(z, x)` (the
      output: class logits, next-token logits or a forecast in the data's units), and
      optionally `init_state(u)` (zeros shaped like u by default).
    `dynamic_length`: takes sequences of any length (export); `per_sample`: the cell never
    mixes samples (no batch statistics, no batch-wide dropout mask), which the solvers'
    `compact` option needs; `time_axis`: the state's axis along which the cell is causal
    (position t of cell(z, u) depends on positions <= t only), which lets `generate`
    keep earlier positions' fixed points when a token is appended; None when unknown.
    """

    inputs: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    dynamic_length: bool = False
    per_sample: bool = True
    time_axis: int | None = None

    def __init__(self, info: DataInfo, deq: DEQ):
        super().__init__()
        self.info = info
        self.deq = deq
        self.warm_start = deq.settings.warm_start
        # deq.warm_start: the last training batch's fixed point, where the next solve
        # starts when shapes match; a checkpoint keeps it (warm_tensors / load_warm)
        self.warm_state: torch.Tensor | tuple[torch.Tensor, ...] | None = None
        self.fixed_point_cache: FixedPointCache | None = None   # set by the trainer
        self.compiled_cell = None    # torch.compile(self.cell) when runtime.compile is on

    def compile_cell(self) -> None:
        """Solve and differentiate through a torch.compile'd cell (weights and checkpoints
        unchanged: the compiled function is not a module, so state_dict never sees it)."""
        self.compiled_cell = torch.compile(self.cell)

    # -- the four pieces a model defines ------------------------------------------------
    def inject(self, x: torch.Tensor) -> torch.Tensor:
        """Input injection u, computed once per forward pass."""
        raise NotImplementedError

    def cell(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One application of the weight-tied map f(z, u)."""
        raise NotImplementedError

    def init_state(self, u: torch.Tensor) -> torch.Tensor:
        """The solver's starting point z0: zeros shaped like u unless a model says otherwise."""
        return torch.zeros_like(u)

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Map a (fixed-point) state to the model's output; `x` is the raw input (a
        forecast may continue from its last value)."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------
    def run(self, x: torch.Tensor, solver: SolveSpec | None = None,
            index: torch.Tensor | None = None) -> ModelOutput:
        """Forward pass with solver statistics; `solver` overrides the recipe's settings.
        `index` (the examples' positions in the training split) lets a training pass start
        from, and update, `fixed_point_cache` when one is set."""
        # One set of normalised weights per pass, made with their graph before the no-grad
        # solve reads them: the map differentiated is then exactly the map solved (spectral
        # norm would otherwise take a power-iteration step on every later cell call).
        with parametrize.cached():
            if torch.is_grad_enabled():
                for module in self.modules():
                    for name in getattr(module, "parametrizations", {}):
                        getattr(module, name)
            return self._run(x, solver, index)

    def _run(self, x: torch.Tensor, solver: SolveSpec | None, index: torch.Tensor | None
             ) -> ModelOutput:
        u = self.inject(x)
        z0 = self.init_state(u)
        if self.training and self.warm_start and self.warm_state is not None \
                and _shapes(self.warm_state) == _shapes(z0):
            z0 = self.warm_state
        cache = self.fixed_point_cache if self.training and index is not None else None
        if cache is not None:
            z0 = cache.start(index, z0)
        cell = self.compiled_cell or self.cell
        z, info = self.deq(cell, u, z0, solver=solver, eager_cell=self.cell)
        if self.training and self.warm_start:
            self.warm_state = _detach(info.forward.z)
        if cache is not None:
            cache.store(index, info.forward.z)
        corrections = [(w, self.decode(zk, x)) for w, zk in info.corrections]
        return ModelOutput(self.decode(z, x), info, corrections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).out

    def warm_tensors(self) -> dict[str, torch.Tensor]:
        """warm_state as a checkpoint's named tensors: "warm", or "warm.0", "warm.1", ...
        for a packed (tuple) state."""
        state = self.warm_state
        if isinstance(state, tuple):
            return {f"warm.{i}": t for i, t in enumerate(state)}
        return {} if state is None else {"warm": state}

    def load_warm(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set warm_state from a checkpoint's tensors (none there: no warm state)."""
        parts, i = [], 0
        while f"warm.{i}" in tensors:
            parts.append(tensors[f"warm.{i}"])
            i += 1
        state = tensors.get("warm", tuple(parts) or None)
        if any(not bool(torch.isfinite(t).all()) for t in _tensors(state)):
            raise ValueError("the warm-start state holds NaN or inf")
        self.warm_state = state


def _shapes(z) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in (z if isinstance(z, (tuple, list)) else (z,))]


def _tensors(z) -> tuple[torch.Tensor, ...]:
    return tuple(z) if isinstance(z, (tuple, list)) else () if z is None else (z,)


def _detach(z):
    return tuple(t.detach() for t in z) if isinstance(z, (tuple, list)) else z.detach()
