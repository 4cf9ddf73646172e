"""`SolveSpec`: how to solve one fixed-point problem (solver, budget, tolerance, knobs), as
plain Python with errors that list the valid choices. The DEQ layer holds three of them
(forward, backward, eval); recipes are one way to fill them in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch

from ..solvers import SolveResult, check_knobs, solve, solver_part

STOP_MODES = ("abs", "rel")


def bf16_problem(tol: float, bf16_until: float | None, tol_key: str) -> str | None:
    """The bf16_until rule, written once: bf16 is for a solve's early iterations, so the
    residual it stops at must lie above the solve's tolerance. Returns what is wrong, for
    the caller to put after the key of bf16_until (`tol_key` names the tolerance), or
    None when the pair is fine."""
    if bf16_until is None or bf16_until > tol:
        return None
    return (f"must be above {tol_key} ({tol:g}): bf16 is only for the early iterations "
            f"(deq.forward.bf16_until=null solves in one precision)")


@dataclass(frozen=True)
class SolveSpec:
    """Settings of one solve. `solver` is a registered name, an import path or a solver
    function; `options` are its own knobs (Anderson's m, lam, beta; Broyden's history,
    line_search, ls_steps; fixed_point's damping; a user solver's keyword arguments)."""

    solver: Any = "anderson"
    max_iter: int = 30
    tol: float = 1e-3
    stop_mode: str = "rel"
    options: Mapping[str, Any] = field(default_factory=dict)
    check_every: int | None = None     # None: every evaluation on CPU, every 4 on GPUs
    compact: bool = False              # evaluate f only on unconverged samples
    bf16_until: float | None = None    # evaluate f in bf16 until the residual is below this
    # the solver function itself, when the caller resolved `solver` already (a recipe's
    # user solver is found relative to the recipe's folder, once)
    fn: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        fn = self.fn or solver_part(self.solver).obj      # ValueError listing the valid names
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode {self.stop_mode!r} is unknown (valid: abs, rel)")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"tol must be a finite number > 0, got {self.tol!r}")
        if self.bf16_until is not None and (
                isinstance(self.bf16_until, bool) or not isinstance(self.bf16_until, (int, float))
                or not self.bf16_until < math.inf):
            raise ValueError(f"bf16_until must be None or a finite number, got {self.bf16_until!r}")
        problem = bf16_problem(self.tol, self.bf16_until, "tol")
        if problem:
            raise ValueError(f"bf16_until: {problem}")
        if self.check_every is not None and self.check_every < 1:
            raise ValueError(f"check_every must be >= 1 or None, got {self.check_every!r}")
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "options", check_knobs(fn, dict(self.options), self.name))

    @property
    def name(self) -> str:
        """The solver as a recipe names it (a function given directly: its __name__)."""
        return self.solver if isinstance(self.solver, str) else self.fn.__name__

    def but(self, **changes: Any) -> SolveSpec:
        """Return a copy with `changes`; switching `solver` drops the old solver's options
        unless new ones are given."""
        if "solver" in changes and changes["solver"] != self.solver:
            changes.setdefault("options", {})
            changes.setdefault("fn", None)
        return replace(self, **changes)

    def run(self, f: Callable, z0: torch.Tensor, **extra: Any) -> SolveResult:
        """Solve z = f(z) from z0 with these settings (`extra`: trace, snapshot_at)."""
        return solve(f, z0, self.fn, tol=self.tol, max_iter=self.max_iter,
                     stop_mode=self.stop_mode, check_every=self.check_every,
                     compact=self.compact, bf16_until=self.bf16_until, **self.options,
                     **extra)

    def describe(self) -> str:
        """e.g. "anderson, tol 0.001 rel, max_iter 30" (+ ", bf16 until 0.01")."""
        mixed = f", bf16 until {self.bf16_until:g}" if self.bf16_until is not None else ""
        return f"{self.name}, tol {self.tol:g} {self.stop_mode}, max_iter {self.max_iter}{mixed}"

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: solver, max_iter, tol, stop_mode (and bf16_until when set)."""
        out = {"solver": self.name, "max_iter": self.max_iter, "tol": self.tol,
               "stop_mode": self.stop_mode}
        if self.bf16_until is not None:
            out["bf16_until"] = self.bf16_until
        return out
