"""Fixed-point solvers behind one function, `solve`, and one registry, `SOLVERS`.

Solvers are pure tensor code: they know nothing of models, files or terminals. Each works
on a flattened (B, D) view of the state, so any layout of z works unchanged. A solver is a
function `(tr, z, **knobs)` over the tracker, which counts every evaluation of f, keeps
each sample's best iterate and decides when to stop (deqctl.solvers.tracker); a user's
solver, named by import path or entry point, gets the same statistics as a built-in.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..options import Block, OptionsError, options_block, validate
from ..registry import Part, PartError, import_builtins
from .broyden import shine_adjoint
from .pack import Packing, State, packing_of
from .registry import SOLVERS
from .tracker import CONVERGED, MAX_ITER, NONFINITE, READOUT_MODES, ReadoutStop, SolveResult, Tracker

__all__ = ["solve", "solver_part", "knob_block", "check_knobs", "SolveResult", "SOLVERS",
           "CONVERGED", "MAX_ITER", "NONFINITE", "Packing", "State", "packing_of",
           "shine_adjoint", "Tracker", "ReadoutStop", "READOUT_MODES"]

_BLOCKS: dict[int, type[Block]] = {}
import_builtins(__name__, __path__)       # a built-in solver is one module here


def solver_part(method: str | Callable) -> Part:
    """The solver `method` names (a registered name, entry point or import path), or
    `method` itself when it is a function; ValueError listing the valid names."""
    if callable(method):
        SOLVERS.check(method, getattr(method, "__name__", "solver"))
        return Part(getattr(method, "__name__", "solver"), method, "user code")
    try:
        return SOLVERS.get(method)
    except PartError as exc:
        raise ValueError(str(exc)) from None


def knob_block(fn: Callable) -> type[Block]:
    """The settings block of a solver's knobs: its keyword arguments after (tr, z)."""
    key = id(fn)
    if key not in _BLOCKS:
        block = options_block(fn, 2, f"{getattr(fn, '__name__', 'solver')} knobs")
        block.__solver__ = fn
        _BLOCKS[key] = block
    return _BLOCKS[key]


def check_knobs(fn: Callable, knobs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`knobs` validated against the solver's signature (all defaults filled in);
    ValueError naming each unknown or wrong one."""
    try:
        return validate(knob_block(fn), knobs, prefix).model_dump()
    except OptionsError as exc:
        raise ValueError("; ".join(exc.lines)) from None


def solve(f: Callable, z0: State, method: str | Callable = "anderson", tol: float = 1e-4,
          max_iter: int = 50, stop_mode: str = "rel", *, check_every: int | None = None,
          compact: bool = False, trace: bool = False, snapshot_at: tuple[int, ...] = (),
          bf16_until: float | None = None, readout: ReadoutStop | None = None,
          **knobs) -> SolveResult:
    """Find z = f(z) for every sample of the batch z0 (first dimension). z0 may be a tuple
    of tensors (f then maps tuples to tuples): they are solved as one state, and res.z and
    the snapshots come back as tuples. `method` is a solver's name or a solver function.

    Returns a SolveResult with the lowest-residual iterate per sample and honest
    statistics. `max_iter` bounds the number of f evaluations. With `compact=True`, f is
    called as f(z, idx) on the unconverged samples only (idx: their positions in z0, or
    None for all), which requires a cell without batch statistics. `trace=True` records
    the residual of every evaluation; `snapshot_at` keeps the iterates at those
    evaluation counts (used by fixed-point correction). With `bf16_until`, f runs under
    bf16 autocast until every running sample's residual is below that value (or bf16
    rounding stops its progress), then in the caller's precision down to `tol`: the
    cheap early iterations of a mixed-precision solve (res.bf16_nfe counts them).
    With `readout` (a ReadoutStop bound to a map from states to log-probabilities), a
    sample also stops once its prediction has settled (res.readout_stopped says which).
    """
    run = solver_part(method).obj
    knobs = check_knobs(run, knobs, f"{getattr(run, '__name__', 'solver')}")
    packing = packing_of(z0)
    if packing is not None:
        f, z0 = packing.wrap(f), packing.pack(z0)
        readout = readout and readout.on_packed(packing)
    with torch.no_grad():
        tr = Tracker(f, z0, tol=tol, max_iter=max_iter, stop_mode=stop_mode,
                     check_every=check_every, compact=compact, trace=trace,
                     snapshot_at=tuple(snapshot_at), bf16_until=bf16_until, readout=readout)
        run(tr, tr.z0.clone(), **knobs)
        res = tr.result()
    if packing is not None:
        res.z = packing.unpack(res.z)
        res.snapshots = {k: packing.unpack(v) for k, v in res.snapshots.items()}
    return res
