"""Bookkeeping shared by every solver: counting, residuals, best iterates, early exit.

Solvers see a flattened working set `z` of shape (b, D) and call `Tracker.evaluate` for
every application of f, so the statistics are honest by construction: each f call is
counted, each sample keeps its lowest-residual iterate, and a sample that converged (or
hit NaN) is frozen. The host is asked whether anything is still running only every
`check_every` evaluations; all other bookkeeping stays on the device.

A solve may also stop a sample on its readout (`ReadoutStop`): at each of those checks the
tracker reads the prediction of each running sample's answer so far (its best iterate)
and stops the sample once that prediction has stopped changing. It is a rule of the
tracker, so every solver, built-in or a user's, stops on it unchanged; residuals are still
measured and reported as they are, so `converged` keeps meaning the residual's tolerance.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

EPS = 1e-12

# per-sample status codes in SolveResult.status
CONVERGED, MAX_ITER, NONFINITE = 0, 1, 2
READOUT_MODES = ("kl", "argmax")


@dataclass(frozen=True)
class ReadoutStop:
    """Stop a sample when its prediction stops changing, checked at the tracker's checks
    (every `check_every` evaluations). `mode` "kl": KL(p_before || p_now) between two
    checks below `kl_tol`; "argmax": the same argmax at `patience` checks in a row. For
    outputs with several positions (a sequence's tokens) every position must pass.
    `log_probs(z, idx)` maps states (shaped like z0, of the samples `idx`, None for all)
    to log-probabilities with the class dimension last; `using` binds it."""

    mode: str
    kl_tol: float = 1e-4      # defaults: bench/readout_stop.py (issue 32)
    patience: int = 4
    log_probs: Callable | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in READOUT_MODES:
            raise ValueError(f"readout stop mode {self.mode!r} is unknown (valid: kl, argmax)")
        if not self.kl_tol > 0:
            raise ValueError(f"kl_tol must be > 0, got {self.kl_tol!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) \
                or self.patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {self.patience!r}")

    def using(self, log_probs: Callable) -> "ReadoutStop":
        """This rule reading predictions through `log_probs(z, idx)`."""
        return replace(self, log_probs=log_probs)

    def on_packed(self, packing) -> "ReadoutStop":
        """This rule reading a packed state (solvers.pack): unpacked, then read as before."""
        read = self.log_probs
        return self.using(lambda z, *idx: read(packing.unpack(z), *idx))

    def describe(self) -> str:
        """e.g. "kl < 0.001" or "argmax stable for 2 checks"."""
        return f"kl < {self.kl_tol:g}" if self.mode == "kl" else \
            f"argmax stable for {self.patience} check{'s' * (self.patience > 1)}"

    def as_dict(self) -> dict:
        """The JSON form: stop_mode and its knob."""
        knob = {"kl_tol": self.kl_tol} if self.mode == "kl" else {"patience": self.patience}
        return {"stop_mode": self.mode, **knob}


@dataclass
class SolveResult:
    """Outcome of a fixed-point solve; per-sample tensors have shape (B,)."""

    z: torch.Tensor                 # best iterate per sample, shape and dtype of z0 (tuple: solve())
    nfe: int                        # f calls actually made (setup and line search included)
    sample_nfe: torch.Tensor        # evaluations each sample took until it stopped
    abs_residual: torch.Tensor      # ||f(z) - z|| of the returned iterate
    rel_residual: torch.Tensor      # ||f(z) - z|| / (||f(z)|| + eps)
    converged: torch.Tensor         # bool
    status: torch.Tensor            # CONVERGED | MAX_ITER | NONFINITE
    fallbacks: torch.Tensor         # least-squares fallbacks taken (Anderson), per sample
    tol: float
    stop_mode: str
    trace_abs: torch.Tensor | None = None   # (n_evals, B); NaN once a sample has stopped
    trace_rel: torch.Tensor | None = None
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # eval index -> iterate
    bf16_nfe: int = 0               # of nfe, the evaluations made in bf16 (solve's bf16_until)
    # Broyden's final inverse-Jacobian estimate (U, V), each (B, n, D): (J_f - I)^-1 is about
    # -I + U^T V per sample (flattened state); reused by the SHINE backward. None elsewhere.
    inverse: tuple[torch.Tensor, torch.Tensor] | None = None
    # with a ReadoutStop: per sample, whether its readout stopped it (None without one)
    readout_stopped: torch.Tensor | None = None

    @property
    def trace(self) -> torch.Tensor | None:
        """Per-evaluation residuals in the stop mode's measure (never padded)."""
        return self.trace_rel if self.stop_mode == "rel" else self.trace_abs

    @property
    def stop_reason(self) -> str:
        """'converged', 'max_iter' or 'nonfinite' for the batch as a whole (syncs the host)."""
        worst = int(self.status.max())
        return ("converged", "max_iter", "nonfinite")[worst]


class Tracker:
    """Runs f for a solver and keeps every statistic of the solve.

    The contract every solver keeps, built-in or a user's (`deq.forward.solver:
    PATH.py:function`): a solver is `solver(tr, z, **knobs) -> None`, with `z` the
    flattened starting state (b, D), and loops

        while True:
            fz, g = tr.evaluate(z)          # f(z) and g = f(z) - z, each (b, D)
            if tr.finished():               # the budget is spent, or every sample stopped
                return
            z = tr.freeze(z_next, z)        # z_next: the solver's new iterate; stopped
                                            # samples stay where they are
            z, *state = tr.compact_state(z, *state)   # with `compact`, drop stopped
                                                      # samples from batch-first state

    It never writes into an iterate it has already evaluated (the tracker may keep it as
    a sample's best). The tracker counts every evaluation (NFE), keeps each sample's
    lowest-residual iterate, decides when to stop and records the residual traces, so a
    user's solver reports the same statistics as a built-in. Its keyword arguments are
    its knobs, validated from its signature (annotations and defaults) like any block.
    """

    def __init__(self, f: Callable, z0: torch.Tensor, *, tol: float, max_iter: int,
                 stop_mode: str, check_every: int | None, compact: bool,
                 trace: bool, snapshot_at: tuple[int, ...] = (),
                 bf16_until: float | None = None, readout: ReadoutStop | None = None):
        if stop_mode not in ("abs", "rel"):
            raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.f, self.shape, self.out_dtype = f, z0.shape, z0.dtype
        self.tol, self.max_iter, self.stop_mode = float(tol), int(max_iter), stop_mode
        self.compact = compact
        # On the CPU the "device" is the host: reading a value back costs nothing extra.
        self.host_reads_free = z0.device.type == "cpu"
        self.check_every = check_every or (1 if self.host_reads_free else 4)
        # Solver state is at least float32 even when f runs under bf16 autocast.
        self.dtype = torch.promote_types(z0.dtype, torch.float32)
        batch, dev = z0.shape[0], z0.device
        self.z0 = z0.detach().reshape(batch, -1).to(self.dtype)
        self.best_z = self.z0.clone()
        self.best_res = torch.full((batch,), float("inf"), device=dev, dtype=self.dtype)
        self.best_abs = torch.full_like(self.best_res, float("inf"))
        self.best_rel = torch.full_like(self.best_res, float("inf"))
        self.active = torch.ones(batch, dtype=torch.bool, device=dev)
        self.nonfinite = torch.zeros_like(self.active)
        self.sample_nfe = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.fallbacks = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.index: torch.Tensor | None = None   # global ids of the working set when compacted
        self.nfe = 0
        self._last_check = 0
        self._all_active = False   # true only right after a check that found every sample running
        self._pending_keep: torch.Tensor | None = None
        self._trace: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if trace else None
        self.snapshot_at = set(snapshot_at)
        self.snapshots: dict[int, torch.Tensor] = {}
        self.inverse: tuple[torch.Tensor, torch.Tensor] | None = None   # set by Broyden
        # Mixed-precision solve: f runs under bf16 autocast until _maybe_leave_bf16 says
        # otherwise, then in the caller's precision. The solver's state and history stay
        # in float32 throughout, so nothing restarts.
        if bf16_until is not None and not torch.amp.is_autocast_available(dev.type):
            raise ValueError(f"bf16_until: no bf16 autocast on {dev.type} devices")
        self.bf16_until = bf16_until
        self.bf16_nfe = 0             # evaluations made in bf16
        self._last_res: torch.Tensor | None = None   # residuals of the latest evaluation
        self._bf16_best, self._bf16_stalls = float("inf"), 0
        if readout is not None and readout.log_probs is None:
            raise ValueError("readout: a ReadoutStop needs its log_probs map (rule.using(fn))")
        self.readout = readout
        self.readout_stopped = torch.zeros_like(self.active) if readout is not None else None
        self._prev_logp: torch.Tensor | None = None   # each sample's prediction at its last check
        self._stable = torch.zeros_like(self.sample_nfe)   # argmax: checks in a row unchanged
        self._checked_res: torch.Tensor | None = None      # best residuals at the last check

    # -- working-set views --------------------------------------------------------------

    def _ws(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.index is None else full[self.index]

    def _put(self, full: torch.Tensor, value: torch.Tensor) -> None:
        if self.index is None:
            full.copy_(value)
        else:
            full[self.index] = value

    @property
    def active_ws(self) -> torch.Tensor:
        """Which samples of the working set are still iterating."""
        return self._ws(self.active)

    # -- the one way to apply f ---------------------------------------------------------

    def evaluate(self, z: torch.Tensor, g_out: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply f to the working set; returns (f(z), f(z) - z), both (b, D). `g_out`, if
        given, receives f(z) - z (a solver's history slot: saves a copy of the state)."""
        b = z.shape[0]
        zin = z.view(b, *self.shape[1:]).to(self.out_dtype)
        # autocast(enabled=False) would also switch off a caller's autocast (hence
        # nullcontext), and a cached bf16 weight would outlive this block inside a caller's
        # fp16 autocast (hence no cache)
        with (torch.autocast(z.device.type, dtype=torch.bfloat16, cache_enabled=False)
              if self.in_bf16 else contextlib.nullcontext()):
            fz = self.f(zin, self.index) if self.compact else self.f(zin)
        fz = fz.reshape(b, -1).to(self.dtype)
        self.nfe += 1
        self.bf16_nfe += self.in_bf16
        self._all_active = False    # samples may converge in this evaluation
        g = torch.sub(fz, z, out=g_out)
        abs_r = torch.linalg.vector_norm(g, dim=1)
        rel_r = abs_r / (torch.linalg.vector_norm(fz, dim=1) + EPS)
        res = rel_r if self.stop_mode == "rel" else abs_r
        self._last_res = res
        finite = torch.isfinite(res)

        act = self.active_ws.clone()  # _put below overwrites self.active in place
        improved = act & finite & (res < self._ws(self.best_res))
        col = improved[:, None]
        if self.index is None:
            if not self.host_reads_free:    # in place: here best_z is never an iterate
                torch.where(col, z, self.best_z, out=self.best_z)
            elif bool(improved.all()):
                # Every sample improved, so the best iterate is z itself: keep a reference
                # instead of a full-state pass (solvers never write into an iterate they
                # have evaluated, but may still read it, so best_z is never written in place)
                self.best_z = z
            else:
                self.best_z = torch.where(col, z, self.best_z)
        else:
            self.best_z[self.index] = torch.where(col, z, self.best_z[self.index])
        for full, new in ((self.best_res, res), (self.best_abs, abs_r), (self.best_rel, rel_r)):
            self._put(full, torch.where(improved, new, self._ws(full)))
        self._put(self.sample_nfe, self._ws(self.sample_nfe) + act.to(torch.int32))
        bad = act & ~finite
        self._put(self.nonfinite, self._ws(self.nonfinite) | bad)
        running = act & finite
        if not self.in_bf16:      # a residual measured in bf16 never stops a sample
            running &= res > self.tol
        self._put(self.active, running)

        if self._trace is not None:
            self._trace.append(self._scatter_trace(abs_r, rel_r, act))
        if self.nfe in self.snapshot_at:
            self.snapshots[self.nfe] = self._scatter_full(z)
        return fz, g

    def _scatter_trace(self, abs_r, rel_r, act):
        nan = torch.tensor(float("nan"), dtype=self.dtype, device=abs_r.device)
        rows = []
        for r in (abs_r, rel_r):
            r = torch.where(act, r, nan)
            if self.index is not None:
                r = torch.full_like(self.best_res, float("nan")).index_put((self.index,), r)
            rows.append(r)
        return rows[0], rows[1]

    def _scatter_full(self, z: torch.Tensor) -> torch.Tensor:
        full = self.best_z.clone()
        self._put(full, z)
        return full.view(self.shape).to(self.out_dtype)

    # -- control ------------------------------------------------------------------------

    def finished(self) -> bool:
        """True when the budget is spent or (at a check point) no sample is still running.

        This is the only host sync of the loop, once every `check_every` evaluations.
        """
        self._all_active = False
        if self.nfe >= self.max_iter:
            return True
        if self.nfe - self._last_check < self.check_every:
            return False
        self._last_check = self.nfe
        if self.readout is not None and not self.in_bf16:
            self._readout_check()
        act = self.active_ws
        if self.in_bf16:     # the worst running residual comes back in the same host read
            worst = torch.where(act, self._last_res, 0.0).max()
            n, worst = torch.stack([act.sum().to(worst.dtype), worst]).tolist()
            n_active = int(n)
            self._maybe_leave_bf16(worst)
        else:
            n_active = int(act.sum())  # host sync
        if n_active == 0:
            return True
        self._all_active = n_active == act.numel()
        if self.compact and n_active < act.numel():
            # applied by compact_state(), once the solver has finished this iteration
            self._pending_keep = act.nonzero().squeeze(1)
        return False

    def _readout_check(self) -> None:
        """Stop the running samples whose prediction has settled (ReadoutStop), all on the
        device: the finished() check that follows reads the count back. The prediction is
        that of the answer the solve would return now, its best iterate."""
        r, batch = self.readout, self.best_res.shape[0]
        z = self._ws(self.best_z).view(-1, *self.shape[1:]).to(self.out_dtype)
        logp = r.log_probs(z, self.index).float()
        logp = logp.reshape(logp.shape[0], -1, logp.shape[-1])      # (b, positions, classes)
        best = self._ws(self.best_res)
        if self._prev_logp is None:        # the first check has nothing to compare with
            self._prev_logp = logp.new_zeros(batch, *logp.shape[1:])
            self._put(self._prev_logp, logp)
            self._checked_res = self.best_res.clone()
            return
        # a best iterate that did not move since the last check (the residual rose) has
        # an unchanged prediction by construction: that says nothing about settling
        moved = best != self._ws(self._checked_res)
        self._put(self._checked_res, best)
        prev = self._ws(self._prev_logp)
        if r.mode == "kl":     # KL(p_before || p_now), the worst position of each sample
            p = prev.exp()     # a class of probability 0 adds nothing (0 * -inf is NaN)
            kl = torch.where(p > 0, p * (prev - logp), 0.0).sum(-1).amax(-1)
            settled = moved & (kl < r.kl_tol)
        else:
            same = (prev.argmax(-1) == logp.argmax(-1)).all(-1)
            stable = self._ws(self._stable)
            stable = torch.where(moved, torch.where(same, stable + 1, 0), stable)
            self._put(self._stable, stable)
            settled = moved & (stable >= r.patience)
        self._put(self._prev_logp, logp)
        stop = self.active_ws & settled
        self._put(self.readout_stopped, self._ws(self.readout_stopped) | stop)
        self._put(self.active, self.active_ws & ~stop)

    @property
    def in_bf16(self) -> bool:
        """Whether f is still evaluated in bf16."""
        return self.bf16_until is not None

    def _maybe_leave_bf16(self, worst: float) -> None:
        """Leave bf16 for good once every running sample is below bf16_until, when bf16
        rounding stalls the solve (no new low of the worst residual for 3 checks), or when
        half the budget is spent, so that full precision always gets the other half. What
        bf16 measured is then forgotten: the returned iterates, residuals and convergence
        come from full-precision evaluations only."""
        if worst < self._bf16_best:
            self._bf16_best, self._bf16_stalls = worst, 0
        else:
            self._bf16_stalls += 1
        if worst <= self.bf16_until or self._bf16_stalls >= 3 or 2 * self.nfe >= self.max_iter:
            self.bf16_until = None
            for best in (self.best_res, self.best_abs, self.best_rel):
                best.masked_fill_(self.active, float("inf"))

    def freeze(self, z_next: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Keep stopped samples where they are: a converged sample stops changing."""
        if self._all_active:     # known from this iteration's check: nothing to hold back
            return z_next
        return torch.where(self.active_ws[:, None], z_next, z)

    def compact_state(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Drop stopped samples from batch-first solver state after a compaction."""
        keep, self._pending_keep = self._pending_keep, None
        if keep is None:
            return tensors
        if self.index is None:    # best_z may be a solver's iterate: own it before writing
            self.best_z = self.best_z.clone()
        self.index = keep if self.index is None else self.index[keep]
        return tuple(t[keep] for t in tensors)

    def count_fallback(self, mask: torch.Tensor) -> None:
        self._put(self.fallbacks, self._ws(self.fallbacks) + (mask & self.active_ws).to(torch.int32))

    def result(self) -> SolveResult:
        # a solve that never left bf16 (budget spent first) converged at no fp32 tolerance
        converged = (self.best_res <= self.tol) & (not self.in_bf16)
        status = torch.full_like(self.sample_nfe, MAX_ITER)
        status = torch.where(converged, CONVERGED, status)
        status = torch.where(self.nonfinite & ~converged, NONFINITE, status)
        trace_abs = trace_rel = None
        if self._trace:
            trace_abs = torch.stack([a for a, _ in self._trace])
            trace_rel = torch.stack([r for _, r in self._trace])
        return SolveResult(
            z=self.best_z.reshape(self.shape).to(self.out_dtype), nfe=self.nfe,
            sample_nfe=self.sample_nfe, abs_residual=self.best_abs, rel_residual=self.best_rel,
            converged=converged, status=status, fallbacks=self.fallbacks, tol=self.tol,
            stop_mode=self.stop_mode, trace_abs=trace_abs, trace_rel=trace_rel,
            snapshots=self.snapshots, inverse=self.inverse, bf16_nfe=self.bf16_nfe,
            readout_stopped=self.readout_stopped)
