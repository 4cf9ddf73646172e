"""Is the gradient a model trains with the one its recipe says? The task loss's gradient on
one batch by the recipe's own backward rule and settings (ift, phantom or jfb, at the
training solve's tolerance), against the exact implicit gradient: the same model in
float64, both solves to a tight tolerance. A backward solve that silently returns zeros,
or a rule that is further from the implicit gradient than its user thinks, shows here.
Where the map does not contract, the reference's own solves do not converge and there is
no exact implicit gradient to be near: the audit counts those samples and says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from ..implicit import DEQ
from ..models import DEQModel
from ..tasks import Task

TIGHT = {"solver": "anderson", "max_iter": 500, "tol": 1e-10, "stop_mode": "rel"}


@dataclass
class GroupReport:
    name: str                  # the parameters' top-level module (e.g. "body", "head")
    cosine: float
    rel_error: float           # ||g - g_exact|| / ||g_exact||

    def to_json(self) -> dict[str, Any]:
        return {"group": self.name, "cosine": self.cosine, "rel_error": self.rel_error}


@dataclass
class GradAudit:
    rule: str                  # e.g. "ift (anderson, tol 0.001 rel, max_iter 20)"
    overall: GroupReport
    groups: list[GroupReport]
    adjoint_residual: float | None       # the recipe's adjoint solve, max relative residual
    exact_residual: float | None         # the reference's (how exact the reference is)
    samples: int
    inexact: int               # samples whose reference forward or adjoint missed TIGHT's tol

    def line(self) -> str:
        text = (f"{self.rule}: cosine {self.overall.cosine:.4f} against the exact implicit "
                f"gradient (relative error {self.overall.rel_error:.2e})")
        if self.inexact:
            text += (f"; but the reference's solves did not converge for {self.inexact} of "
                     f"{self.samples} samples (no fixed point the map contracts to there): "
                     f"no exact gradient to compare with")
        return text

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, **self.overall.to_json(), "group": None,
                "groups": [g.to_json() for g in self.groups],
                "adjoint_residual": self.adjoint_residual, "exact_residual": self.exact_residual,
                "samples": self.samples, "inexact_samples": self.inexact}


def audit_gradient(model: DEQModel, task: Task, x: torch.Tensor, y: torch.Tensor,
                   seed: int = 0) -> GradAudit:
    """The recipe's gradient of task.loss on (x, y) against the exact implicit one.
    ValueError for an explicit baseline: it has no fixed point, so no implicit gradient."""
    if model.deq.mode == "baseline":
        raise ValueError("deq.mode=baseline: an explicit network has no fixed point, so "
                         "no implicit gradient to audit its gradient against")
    got, info = _gradient(model, task, x, y, seed)
    exact, exact_info = exact_gradient(model, task, x, y, seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.split(".")[0], []).append(n)
    reports = [_compare(g, [got[n] for n in ns], [exact[n] for n in ns])
               for g, ns in groups.items()]
    overall = _compare("all", [got[n] for n in names], [exact[n] for n in names])
    converged = exact_info.forward.converged & exact_info.backward.converged
    return GradAudit(_rule(model.deq), overall, reports, _residual(info), _residual(exact_info),
                     len(converged), int((~converged).sum()))


def exact_gradient(model: DEQModel, task: Task, x: torch.Tensor, y: torch.Tensor,
                   seed: int = 0) -> tuple[dict[str, torch.Tensor], Any]:
    """{parameter name: the exact implicit gradient of task.loss} (float64 copy of the
    model, forward and adjoint solved to rel 1e-10), and the copy's DEQInfo."""
    exact_model = _copy(model).double()
    exact_model.deq = DEQ(forward=TIGHT, backward={**TIGHT, "mode": "ift"})
    return _gradient(exact_model, task, _double(x), y, seed)


def _copy(model: DEQModel) -> DEQModel:
    """A deep copy, leaving out what a model stashed during its last pass (a tensor with a
    graph, such as monDEQ's per-pass operator, which deepcopy refuses): the next pass
    computes it again."""
    stashed = [(m, k, v) for m in model.modules() for k, v in vars(m).items()
               if torch.is_tensor(v) and v.grad_fn is not None]
    for m, k, _ in stashed:
        setattr(m, k, None)
    try:
        return copy.deepcopy(model)
    finally:
        for m, k, v in stashed:
            setattr(m, k, v)


def _gradient(model: DEQModel, task: Task, x: torch.Tensor, y: torch.Tensor, seed: int
              ) -> tuple[dict[str, torch.Tensor], Any]:
    """{parameter name: gradient of the task loss} by the model's own DEQ layer, in
    training mode (its training solve and backward rule) with the same dropout masks."""
    was_training, step, warm = model.training, model.deq.step, model.warm_state
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    try:
        out = model.run(x)
        task.loss(out.out, y).backward()
    finally:
        model.train(was_training)
        model.deq.step, model.warm_state = step, warm     # the audit is not a training step
    grads = {n: (p.grad.detach().double().flatten() if p.grad is not None
                 else torch.zeros(p.numel(), dtype=torch.float64, device=p.device))
             for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads, out.info


def _compare(name: str, got: list[torch.Tensor], exact: list[torch.Tensor]) -> GroupReport:
    g, e = torch.cat(got).cpu(), torch.cat(exact).cpu()
    denom = float(g.norm() * e.norm())
    cosine = float(g @ e) / denom if denom > 0 else 0.0
    return GroupReport(name, cosine, float((g - e).norm() / e.norm().clamp_min(1e-300)))


def _rule(deq: DEQ) -> str:
    if deq.mode == "unrolled":
        return f"unrolled ({deq.unrolled_depth} steps)"
    if deq.backward_mode == "phantom":
        return f"phantom ({deq.phantom_steps} steps, tau {deq.phantom_tau:g})"
    if deq.backward_mode == "jfb":
        return "jfb (one step)"
    return f"ift ({deq.bwd_spec.describe()})"


def _residual(info: Any) -> float | None:
    b = getattr(info, "backward", None)
    return float(b.rel_residual.max()) if b is not None else None


def _double(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.is_floating_point() else x
