"""Fixed-point solvers behind one function, `solve`.

Solvers are pure tensor code: they know nothing of models, files or terminals. Each works
on a flattened (B, D) view of the state, so any layout of z works unchanged.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from .anderson import anderson
from .broyden import broyden, shine_adjoint
from .fixed_point import fixed_point
from .pack import Packing, State, packing_of
from .tracker import CONVERGED, MAX_ITER, NONFINITE, SolveResult, Tracker

SOLVERS: dict[str, Callable] = {"fixed_point": fixed_point, "anderson": anderson,
                                "broyden": broyden}

__all__ = ["solve", "check_options", "SolveResult", "SOLVERS", "CONVERGED", "MAX_ITER",
           "NONFINITE", "Packing", "State", "packing_of", "shine_adjoint"]


def check_options(method: str, knobs: dict) -> None:
    """Raise ValueError unless `method` is a solver and `knobs` are options it takes."""
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r} (valid: {', '.join(SOLVERS)})")
    allowed = [p for p in inspect.signature(SOLVERS[method]).parameters if p not in ("tr", "z")]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(f"solver {method!r} has no option {', '.join(unknown)} "
                         f"(valid: {', '.join(allowed) or 'none'})")


def solve(f: Callable, z0: State, method: str = "anderson", tol: float = 1e-4,
          max_iter: int = 50, stop_mode: str = "rel", *, check_every: int | None = None,
          compact: bool = False, trace: bool = False, snapshot_at: tuple[int, ...] = (),
          bf16_until: float | None = None, **knobs) -> SolveResult:
    """Find z = f(z) for every sample of the batch z0 (first dimension). z0 may be a tuple
    of tensors (f then maps tuples to tuples): they are solved as one state, and res.z and
    the snapshots come back as tuples.

    Returns a SolveResult with the lowest-residual iterate per sample and honest
    statistics. `max_iter` bounds the number of f evaluations. With `compact=True`, f is
    called as f(z, idx) on the unconverged samples only (idx: their positions in z0, or
    None for all), which requires a cell without batch statistics. `trace=True` records
    the residual of every evaluation; `snapshot_at` keeps the iterates at those
    evaluation counts (used by fixed-point correction). With `bf16_until`, f runs under
    bf16 autocast until every running sample's residual is below that value (or bf16
    rounding stops its progress), then in the caller's precision down to `tol`: the
    cheap early iterations of a mixed-precision solve (res.bf16_nfe counts them).
    """
    check_options(method, knobs)
    run = SOLVERS[method]
    packing = packing_of(z0)
    if packing is not None:
        f, z0 = packing.wrap(f), packing.pack(z0)
    with torch.no_grad():
        tr = Tracker(f, z0, tol=tol, max_iter=max_iter, stop_mode=stop_mode,
                     check_every=check_every, compact=compact, trace=trace,
                     snapshot_at=tuple(snapshot_at), bf16_until=bf16_until)
        run(tr, tr.z0.clone(), **knobs)
        res = tr.result()
    if packing is not None:
        res.z = packing.unpack(res.z)
        res.snapshots = {k: packing.unpack(v) for k, v in res.snapshots.items()}
    return res
