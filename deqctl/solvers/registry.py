"""The solver registry: built-ins register here exactly as an installed package's solvers
(entry-point group `deqctl.solvers`) or a user's (`PATH.py:function`) are found.

A solver is a function `(tr, z, **knobs) -> None` over the tracker (see
deqctl.solvers.tracker); its keyword arguments are its knobs, validated from its signature.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..registry import PartError, Registry


def _is_solver(obj: Any, ref: str) -> None:
    if not callable(obj) or inspect.isclass(obj):
        raise PartError(f"{ref}: a solver is a function (tr, z, **knobs)")
    params = list(inspect.signature(obj).parameters.values())
    if len(params) < 2 or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                              for p in params[:2]):
        raise PartError(f"{ref}: a solver takes (tr, z, **knobs): the tracker and the "
                        f"flattened state first")


SOLVERS = Registry("solver", "deq.forward.solver", "deqctl.solvers", check=_is_solver)
