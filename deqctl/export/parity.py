"""Parity of an exported artefact against the eager DEQ: how far its outputs are and how
often its predictions agree (as the task defines agreement), with the thresholds a user sets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tasks import Task


@dataclass
class Parity:
    """Artefact vs eager model on one batch (plus the exporter's own error)."""

    n: int
    max_abs_diff: float        # max |out_artefact - out_eager| over the batch
    agreement: float           # fraction of predictions that agree (Task.agree)
    export_error: float        # max |out_artefact - out_unrolled_torch|: the exporter's share
    scale: float = 1.0         # max |out_eager|, what "small" is measured against

    # Float32 graphs that compute the same thing differ by ~1e-6 of the output scale when
    # the cell contracts; when it does not (rho(df/dz) >= 1), the unrolled iterations
    # amplify rounding differences (seen: 1e-2 on a trained MNIST model), so only
    # differences near the output scale itself are taken as a broken translation.
    EXPORT_RTOL = 1e-2

    def problems(self, max_diff: float | None, min_agree: float | None) -> list[str]:
        """Return the failed checks as phrases (empty when parity holds)."""
        out = []
        if max_diff is not None and not self.max_abs_diff <= max_diff:   # NaN fails too
            out.append(f"max |diff| {self.max_abs_diff:.3g} > --max-diff {max_diff:g}")
        if min_agree is not None and not self.agreement >= min_agree:
            out.append(f"prediction agreement {self.agreement:.2%} < --min-agree {min_agree:.2%}")
        limit = self.EXPORT_RTOL * (1.0 + self.scale)
        if not self.export_error <= limit:
            out.append(f"the exported graph differs from the torch model it was traced from "
                       f"by {self.export_error:.3g} (> {limit:.3g}): an exporter problem, or "
                       f"rounding amplified by a cell that does not contract (deqctl solve-trace)")
        return out


def compare(task: Task, eager: torch.Tensor, candidate: torch.Tensor,
            unrolled: torch.Tensor | None = None) -> Parity:
    """Return the Parity of `candidate` outputs against `eager` ones (same batch); with
    `unrolled` (the torch module that was exported), also the exporter's own error."""
    eager, candidate = eager.detach().float().cpu(), candidate.detach().float().cpu()
    if eager.shape != candidate.shape:
        raise ValueError(f"output shapes differ: eager {tuple(eager.shape)}, "
                         f"exported {tuple(candidate.shape)}")
    diff = float((candidate - eager).abs().max()) if eager.numel() else 0.0
    agree = float(task.agree(candidate, eager).float().mean())
    err = 0.0 if unrolled is None else float((candidate - unrolled.detach().float().cpu()).abs().max())
    scale = float(eager.abs().max()) if eager.numel() else 1.0
    return Parity(n=eager.shape[0], max_abs_diff=diff, agreement=agree, export_error=err,
                  scale=scale)
