"""Solver comparison on one batch: the true per-iteration residuals of each solver from the
same starting point, forward and (optionally) for the adjoint solve of the backward pass,
plus the local contraction at z* (spectral radius vs observed fixed-point rate).

`compare_solvers` is pure tensor code (any f); `trace_model` drives it through a model's
inject / init_state / cell / decode, so it works for every DEQModel.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.nn.utils import parametrize

from ..implicit import SolveSpec, adjoint_map, cell_map
from ..models import DEQModel
from ..numbers import finite
from ..solvers import packing_of
from ..tasks import Task
from .spectral import linear_rate, spectral_radius


@dataclass
class SolverTrace:
    """One solver's run on the batch. Per-iteration lists are over the samples still
    iterating at that evaluation (a stopped sample's residual is NaN in the raw trace)."""

    name: str
    nfe: int                        # f evaluations made for the batch
    converged: float                # fraction of samples at tol
    time_s: float                   # wall time of the whole solve
    time_to_tol_s: float | None     # = time_s when every sample reached tol, else None
    abs_median: list[float]
    abs_max: list[float]
    rel_median: list[float]
    rel_max: list[float]
    abs_residual: float             # median over samples of the final (best) residual
    rel_residual: float
    z: torch.Tensor = field(repr=False)           # the solution (best iterate per sample)
    trace_abs: torch.Tensor = field(repr=False)   # raw (n_evals, B)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form: nfe, converged, time_s, time_to_tol_s, abs/rel traces
        (median over the batch) and their per-iteration maxima; NaN becomes null."""
        return {"nfe": self.nfe, "converged": self.converged, "time_s": self.time_s,
                "time_to_tol_s": self.time_to_tol_s,
                "abs_residual": finite(self.abs_residual), "rel_residual": finite(self.rel_residual),
                "abs_trace": _finites(self.abs_median), "rel_trace": _finites(self.rel_median),
                "abs_trace_max": _finites(self.abs_max), "rel_trace_max": _finites(self.rel_max)}


@dataclass
class TraceReport:
    """Everything `deqctl solve-trace` shows; `to_json()` is its --json file."""

    batch: int
    forward_settings: SolveSpec
    forward: dict[str, SolverTrace]
    spectral_radius: torch.Tensor            # (B,) at the best forward solution
    spectral_from: str                       # which solver's z* it was measured at
    fixed_point_rate: torch.Tensor | None    # (B,) observed, None without fixed_point
    backward_settings: SolveSpec | None = None
    backward: dict[str, SolverTrace] | None = None

    def to_json(self) -> dict[str, Any]:
        """Return {"solvers": {NAME: SolverTrace.to_json()}, "spectral_radius" (max over
        the batch), its median and per-sample values, "fixed_point_rate" (max and median),
        the settings, and "backward" (same shape) when traced}."""
        rho = self.spectral_radius.cpu().double()
        out: dict[str, Any] = {
            "batch": self.batch, "settings": _settings(self.forward_settings),
            "solvers": {k: t.to_json() for k, t in self.forward.items()},
            "spectral_radius": finite(rho.max()), "spectral_radius_median": finite(rho.median()),
            "spectral_radius_per_sample": _finites(rho.tolist()), "spectral_radius_at": self.spectral_from,
            "fixed_point_rate": None, "fixed_point_rate_median": None}
        if self.fixed_point_rate is not None:
            out["fixed_point_rate"], out["fixed_point_rate_median"] = _nan_stats(self.fixed_point_rate)
        if self.backward is not None:
            out["backward"] = {"settings": _settings(self.backward_settings),
                               "solvers": {k: t.to_json() for k, t in self.backward.items()}}
        return out


@dataclass
class BaselineReport:
    """What `deqctl solve-trace` reports of an explicit baseline (deq.mode=baseline): the
    network is evaluated once, so there is no fixed point, solver trace or radius."""

    network: str           # the baseline's class, e.g. CNNBaseline
    batch: int
    time_s: float          # wall time of the one evaluation of the batch

    def to_json(self) -> dict[str, Any]:
        """Return the --json form, with the keys a DEQ's trace has that do not apply empty:
        {"batch", "network", "nfe": 1, "time_s", "solvers": {}, "spectral_radius": None,
        "fixed_point_rate": None}."""
        return {"batch": self.batch, "network": self.network, "nfe": 1, "time_s": self.time_s,
                "solvers": {}, "spectral_radius": None, "fixed_point_rate": None}


def trace_baseline(model: DEQModel, x: torch.Tensor) -> BaselineReport:
    """Time the one evaluation of an explicit baseline on the batch x (after a warm-up,
    as `compare_solvers` times each solve)."""
    model.eval()
    with torch.no_grad():
        model(x)
        _sync(x)
        start = time.perf_counter()
        model(x)
        _sync(x)
    return BaselineReport(type(model).__name__, x.shape[0], time.perf_counter() - start)


def compare_solvers(f: Callable, z0: torch.Tensor, specs: Sequence[SolveSpec]
                    ) -> dict[str, SolverTrace]:
    """Run each solve spec on z = f(z) from the same z0; return {solver: SolverTrace}.

    Convergence is checked after every evaluation (check_every=1), so NFE and time to tol
    are exact rather than rounded up to a check interval.
    """
    with torch.no_grad():
        f(z0)   # warm-up (first-call allocations, cached weights) outside every timing
    out = {}
    for s in specs:
        name = s.solver
        _sync(z0)
        start = time.perf_counter()
        res = s.but(check_every=1).run(f, z0, trace=True)
        _sync(z0)
        elapsed = time.perf_counter() - start
        conv = float(res.converged.float().mean())
        out[name] = SolverTrace(
            name=name, nfe=res.nfe, converged=conv, time_s=elapsed,
            time_to_tol_s=elapsed if conv == 1.0 else None,
            abs_median=_nan_median(res.trace_abs), abs_max=_nan_max(res.trace_abs),
            rel_median=_nan_median(res.trace_rel), rel_max=_nan_max(res.trace_rel),
            abs_residual=float(res.abs_residual.cpu().double().median()),
            rel_residual=float(res.rel_residual.cpu().double().median()),
            z=res.z, trace_abs=res.trace_abs)
    return out


def trace_model(model: DEQModel, task: Task, x: torch.Tensor, y: torch.Tensor,
                forward: Sequence[SolveSpec], backward: Sequence[SolveSpec] = (),
                power_iters: int = 100) -> TraceReport:
    """Trace `model`'s fixed-point solve on the batch (x, y) with each forward spec (one
    per solver, sharing max_iter, tol and stop mode); with `backward` specs, also the
    adjoint solve y = J^T y + dL/dz at z*. Returns a TraceReport."""
    model.eval()
    u, z0, cell, decode = model_map(model, x)
    f = cell_map(cell, u)
    # cached(): the normalised weights are computed once, not on every f call.
    with parametrize.cached():
        fwd = compare_solvers(f, z0, forward)
        best = min(fwd.values(), key=lambda t: (-t.converged, _or_inf(t.rel_residual)))
        z_star = best.z
        rho = spectral_radius(lambda z: cell(z, u), z_star, iters=power_iters)
        rate = None
        if "fixed_point" in fwd:
            rate = linear_rate(fwd["fixed_point"].trace_abs)
        report = TraceReport(batch=x.shape[0], forward_settings=forward[0], forward=fwd,
                             spectral_radius=rho.detach().cpu(), spectral_from=best.name,
                             fixed_point_rate=rate)
        if backward:
            report.backward_settings = backward[0]
            report.backward = _trace_adjoint(cell, decode, task, u, z_star, y, backward)
    return report


def model_map(model: DEQModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                         Callable, Callable]:
    """(u, z0, cell, decode) of `model` on x as the solvers see them: a state of several
    tensors becomes the one packed state, and cell and decode take it packed."""
    with torch.no_grad():
        u = model.inject(x)
        z0 = model.init_state(u)
    packing = packing_of(z0)
    if packing is None:
        return u, z0, model.cell, lambda z: model.decode(z, x)
    return (u, packing.pack(z0), packing.wrap(model.cell),
            lambda z: model.decode(packing.unpack(z), x))


def _trace_adjoint(cell: Callable, decode: Callable, task: Task, u: torch.Tensor,
                   z_star: torch.Tensor, y: torch.Tensor, specs: Sequence[SolveSpec]
                   ) -> dict[str, SolverTrace]:
    """Trace the implicit-gradient solve y = J^T y + g, g = dL/dz at z*, as the DEQ
    layer's IFT backward does (one recorded f, vector-Jacobian products against it)."""
    z_in = z_star.detach().clone().requires_grad_()
    z_dec = z_star.detach().clone().requires_grad_()
    with torch.enable_grad():
        z_out = cell(z_in, u)
        (g,) = torch.autograd.grad(task.loss(decode(z_dec), y), z_dec)

    # from where the layer's adjoint solve starts (implicit.adjoint_solve), never compacted
    return compare_solvers(adjoint_map(z_out, z_in, g), g, [s.but(compact=False) for s in specs])


# --- small helpers ---------------------------------------------------------------------


def _nan_median(t: torch.Tensor) -> list[float]:
    return t.cpu().double().nanmedian(dim=1).values.tolist()


def _nan_max(t: torch.Tensor) -> list[float]:
    t = t.cpu().double()
    stopped = torch.isnan(t)
    top = torch.where(stopped, float("-inf"), t).amax(dim=1)
    return torch.where(stopped.all(dim=1), float("nan"), top).tolist()


def _nan_stats(t: torch.Tensor) -> tuple[float | None, float | None]:
    """(max, median) over the finite entries, None when there are none."""
    t = t[torch.isfinite(t)].cpu().double()
    if t.numel() == 0:
        return None, None
    return float(t.max()), float(t.median())


def _finites(values: list[float]) -> list[float | None]:
    return [finite(v) for v in values]


def _or_inf(v: float) -> float:
    """`v` for ranking: NaN (which compares as nothing) ranks as infinitely bad."""
    return math.inf if finite(v) is None else v


def _settings(s: SolveSpec | None) -> dict[str, Any] | None:
    return None if s is None else {k: v for k, v in s.as_dict().items() if k != "solver"}


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
