"""Is the gradient a model trains with the one its recipe says? The task loss's gradient on
one batch by the recipe's own backward rule and settings (ift, phantom or jfb, at the
training solve's tolerance), against the exact implicit gradient: the same model in
float64, both solves to a tight tolerance. A backward solve that silently returns zeros,
or a rule that is further from the implicit gradient than its user thinks, shows here.
Where the map does not contract, the reference's own solves do not converge and there is
no exact implicit gradient to be near: the audit compares the gradients over the samples
with a fixed point, and counts the others apart, so a bad gradient and a sample with no
fixed point never hide in one number.
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
    overall: GroupReport | None          # over the samples with a fixed point; None: none has
    groups: list[GroupReport]
    adjoint_residual: float | None       # the recipe's adjoint solve, max relative residual
    exact_residual: float | None         # the reference's (how exact the reference is)
    samples: int
    inexact: int               # samples whose reference forward or adjoint missed TIGHT's tol

    @property
    def no_fixed_point(self) -> float:
        """The fraction of samples with no fixed point (no exact gradient)."""
        return self.inexact / self.samples

    def line(self) -> str:
        if self.overall is None:
            return (f"{self.rule}: no sample of {self.samples} has a fixed point (the "
                    f"reference's solves did not converge): no exact gradient to compare with")
        text = (f"{self.rule}: cosine {self.overall.cosine:.4f} against the exact implicit "
                f"gradient (relative error {self.overall.rel_error:.2e})")
        if self.inexact:
            text += (f" over the {self.samples - self.inexact} of {self.samples} samples with a "
                     f"fixed point; {self.inexact} have none (the reference's solves did not "
                     f"converge there: no exact gradient to compare with)")
        return text

    def failures(self, min_cos: float | None, max_no_fixed_point: float | None) -> list[str]:
        """What falls short of `solve-trace --min-cos` and `--max-no-fixed-point`."""
        out = []
        if min_cos is not None and (self.overall is None or self.overall.cosine < min_cos):
            out.append(f"--min-cos {min_cos:g}: " + (
                "no sample has a fixed point to judge the gradient on" if self.overall is None
                else f"the training gradient's cosine is {self.overall.cosine:.4f}"))
        if max_no_fixed_point is not None and self.no_fixed_point > max_no_fixed_point:
            out.append(f"--max-no-fixed-point {max_no_fixed_point:g}: {self.inexact} of "
                       f"{self.samples} samples have no fixed point")
        return out

    def to_json(self) -> dict[str, Any]:
        overall = (self.overall.to_json() if self.overall is not None
                   else {"cosine": None, "rel_error": None})
        return {"rule": self.rule, **overall, "group": None,
                "groups": [g.to_json() for g in self.groups],
                "adjoint_residual": self.adjoint_residual, "exact_residual": self.exact_residual,
                "samples": self.samples, "inexact_samples": self.inexact,
                "no_fixed_point_fraction": self.no_fixed_point}


def audit_gradient(model: DEQModel, task: Task, x: torch.Tensor, y: torch.Tensor,
                   seed: int = 0) -> GradAudit:
    """The recipe's gradient of task.loss on (x, y) against the exact implicit one, over
    the samples with a fixed point (those whose reference solves converged). ValueError for
    an explicit baseline: it has no fixed point, so no implicit gradient."""
    if model.deq.mode == "baseline":
        raise ValueError("deq.mode=baseline: an explicit network has no fixed point, so "
                         "no implicit gradient to audit its gradient against")
    exact, exact_info = exact_gradient(model, task, x, y, seed)
    fixed = (exact_info.forward.converged & exact_info.backward.converged).cpu()
    samples, inexact = len(fixed), int((~fixed).sum())
    if inexact:                               # the loss over the others, and its gradients
        keep = fixed.nonzero().squeeze(1)
        x, y = x[keep.to(x.device)], y[keep.to(y.device)]
        exact, exact_info = exact_gradient(model, task, x, y, seed) if len(keep) else ({}, None)
    if inexact == samples:
        return GradAudit(_rule(model.deq), None, [], None, None, samples, inexact)
    got, info = _gradient(model, task, x, y, seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.split(".")[0], []).append(n)
    reports = [_compare(g, [got[n] for n in ns], [exact[n] for n in ns])
               for g, ns in groups.items()]
    overall = _compare("all", [got[n] for n in names], [exact[n] for n in names])
    return GradAudit(_rule(model.deq), overall, reports, _residual(info), _residual(exact_info),
                     samples, inexact)


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
    if deq.mode == "recurrent":
        r = deq.settings.recurrent
        return (f"recurrent ({r.distribution} depth {deq.settings.recurrent_mean:g}, "
                f"backprop {r.backprop or 'all'})")
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
