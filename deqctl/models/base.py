"""What every DEQ model shares: input injection, a weight-tied cell, a decoder, and the
DEQ layer between them. Subclasses define `inject`, `cell`, `decode` (and `init_state`);
tools (eval, solve-trace, export) only use those four and so work for any model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..data import DataInfo
from ..implicit import DEQ, DEQInfo, SolveSpec
from ..implicit.cache import FixedPointCache
from ..solvers import SolveResult
from ..tasks import TASKS, Task, task_for


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
        # deq.eval.stop_mode kl / argmax: evaluation solves stop on the prediction, read
        # as the task reads an output; an output that is no distribution cannot
        if deq.readout_stop is not None and not TASKS[info.task].distribution:
            raise ValueError(f"deq.eval.stop_mode={deq.readout_stop.mode}: a "
                             f"{info.task} model's output is no distribution to stop on "
                             f"(use abs or rel)")
        self.readout_audit: ReadoutAudit | None = None    # set by auditing_readout()
        self._readout_task: Task | None = None   # made on first use: models may be built
                                                  # on the meta device, a task's constants not

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

    def readout_log_probs(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the prediction at state z (decode, then the task's
        softmax, class dimension last): what a readout stop watches settle."""
        if self._readout_task is None:
            self._readout_task = task_for(self.info)
        return self._readout_task.log_probs(self.decode(z, x))

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
        readout = None
        if self.deq.readout_stop is not None and not self.training:
            def readout(z, idx):
                return self.readout_log_probs(z, x if idx is None else x[idx])
        z, info = self.deq(cell, u, z0, solver=solver, eager_cell=self.cell, readout=readout)
        if self.readout_audit is not None and readout is not None:
            # the residual-stopped answer on the same batch, from the same start
            z_ref, ref = self.deq(cell, u, z0, solver=solver, eager_cell=self.cell)
            self.readout_audit.add(self.decode(z, x), self.decode(z_ref, x), info.forward,
                                   ref.forward)
        if self.training and self.warm_start:
            self.warm_state = _detach(info.forward.z)
        if cache is not None:
            cache.store(index, info.forward.z)
        corrections = [(w, self.decode(zk, x)) for w, zk in info.corrections]
        return ModelOutput(self.decode(z, x), info, corrections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).out

    @contextlib.contextmanager
    def auditing_readout(self, agree: Callable) -> Iterator[ReadoutAudit]:
        """Within: every evaluation pass that stops on its readout also solves the same
        batch on the residual alone, and the yielded ReadoutAudit tallies what the readout
        stop saved and how often (`agree(a, b)`, the task's) the two answers agree."""
        self.readout_audit = ReadoutAudit(agree)
        try:
            yield self.readout_audit
        finally:
            self.readout_audit = None

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


class ReadoutAudit:
    """A readout stop against the residual stop, over the batches of an evaluation: f
    evaluations per sample (what each sample took until it stopped) and per batch (what
    the solve spent: a batch runs until its last sample stops), and the agreement of
    the two answers. Sums stay on the device until `summary`."""

    def __init__(self, agree: Callable):
        self.agree, self.sums = agree, None

    def add(self, out: torch.Tensor, ref_out: torch.Tensor, res: SolveResult,
            ref: SolveResult) -> None:
        """Tally one batch: outputs and solves with the readout stop and without it."""
        agree = self.agree(out, ref_out).float()
        # where the residual solve reached its tolerance its answer is the fixed point's;
        # elsewhere it is only the best iterate at max_iter, itself no settled answer
        conv = ref.converged.view(-1, *(1,) * (agree.dim() - 1)).expand_as(agree).float()
        batch = [agree.sum(), torch.tensor(float(agree.numel())),
                 (agree * conv).sum(), conv.sum(),
                 res.sample_nfe.sum().float(), ref.sample_nfe.sum().float(),
                 torch.tensor(float(res.nfe)), torch.tensor(float(ref.nfe)),
                 res.readout_stopped.sum().float(), torch.tensor(float(res.sample_nfe.numel()))]
        batch = torch.stack([t.to(agree.device) for t in batch])
        self.sums = batch if self.sums is None else self.sums + batch

    def summary(self) -> dict[str, Any]:
        """readout_stopped (fraction of samples), fwd_nfe and residual_fwd_nfe (per
        sample), nfe_ratio (readout / residual, per sample), nfe_ratio_batch (the same for
        the evaluations a batch spent), nfe_saved (1 - nfe_ratio), agreement, and
        agreement_converged (over the samples whose residual solve converged; None: none)."""
        if self.sums is None:
            return {}
        agreed, preds, agreed_conv, conv, nfe, ref_nfe, batch, ref_batch, stopped, n = \
            self.sums.tolist()
        return {"readout_stopped": stopped / n, "fwd_nfe": nfe / n,
                "residual_fwd_nfe": ref_nfe / n, "nfe_ratio": nfe / ref_nfe,
                "nfe_ratio_batch": batch / ref_batch, "nfe_saved": 1 - nfe / ref_nfe,
                "agreement": agreed / preds,
                "agreement_converged": agreed_conv / conv if conv else None}


def _shapes(z) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in (z if isinstance(z, (tuple, list)) else (z,))]


def _tensors(z) -> tuple[torch.Tensor, ...]:
    return tuple(z) if isinstance(z, (tuple, list)) else () if z is None else (z,)


def _detach(z):
    return tuple(t.detach() for t in z) if isinstance(z, (tuple, list)) else z.detach()
