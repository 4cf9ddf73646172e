"""The metrics keys: one table of every key a metrics row may hold, how it is reduced over
the batches of an interval and over the ranks of torchrun, and when a row has it.

The accumulator, the distributed merge, `eval`, the live table, `compare` and the
TensorBoard sink all read this table; code names a key as `K.fwd_nfe` (a key missing from
the table is an AttributeError, not a silent None), and a test checks that every key in
the table is produced by a real run. A task's own statistics (accuracy, mae, ...) are
means over batches and ranks unless the table says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace


@dataclass(frozen=True)
class Key:
    name: str
    batches: str | None       # "mean" (weighted by samples) | "max" | "sum" | None: per row
    ranks: str                # "mean" | "max" | "sum" | "same" (every rank has one value)
    when: str                 # which rows hold it
    doc: str


TABLE = (
    Key("step", None, "same", "all", "optimizer steps done"),
    Key("epoch", None, "same", "all", "epochs done, fractional"),
    Key("split", None, "same", "all", "train | val | test"),
    Key("n", "sum", "sum", "all", "samples in the interval or evaluation"),
    Key("loss", "mean", "mean", "all", "the task loss (what the task reports)"),
    Key("lr", None, "same", "train", "learning rate of the row's last step"),
    Key("fwd_nfe", "mean", "mean", "all", "f evaluations per sample, mean"),
    Key("fwd_nfe_max", "max", "max", "all", "f evaluations of the solve (setup included)"),
    Key("fwd_nfe_bf16", "max", "max", "bf16_until", "of fwd_nfe_max, evaluations in bf16"),
    Key("fwd_abs_residual", "mean", "mean", "all", "||f(z) - z|| of the returned z, mean"),
    Key("fwd_abs_residual_max", "max", "max", "all", "... max over samples"),
    Key("fwd_rel_residual", "mean", "mean", "all", "||f(z) - z|| / ||f(z)||, mean"),
    Key("fwd_rel_residual_max", "max", "max", "all", "... max over samples"),
    Key("fwd_converged", "mean", "mean", "all", "fraction of solves that reached tol"),
    Key("fwd_stop", None, "same", "all", "worst stop reason: conv | max_iter | nonfinite"),
    Key("nonfinite", "sum", "sum", "all", "samples whose solve hit NaN/inf"),
    Key("fallbacks", "sum", "sum", "all", "Anderson least-squares fallbacks"),
    Key("jac_loss", "mean", "mean", "jacobian_reg", "Hutchinson ||df/dz||_F^2 / dim"),
    Key("depth", "mean", "same", "recurrent", "applications of the cell drawn per training "
        "step (deq.mode=recurrent), mean"),
    Key("bwd_nfe", "mean", "mean", "train", "adjoint iterations (phantom/jfb: fixed steps)"),
    Key("bwd_rel_residual", "mean", "mean", "ift", "relative residual of the adjoint solve"),
    Key("bwd_rel_residual_max", "max", "max", "ift", "... max over samples"),
    Key("skipped_steps", "sum", "sum", "train", "steps dropped for a non-finite loss or gradient"),
    Key("grad_norm", "mean", "mean", "train", "gradient norm before clipping, mean over steps"),
    Key("loss_spikes", None, "max", "train", "steps whose loss exceeded 3x the median of the "
        "50 before (per rank; the most of any rank)"),
    Key("step_time_s", None, "max", "train", "seconds per optimizer step in the interval"),
    Key("samples_per_s", None, "sum", "all", "throughput"),
    Key("eval_time_s", None, "max", "eval", "seconds the evaluation took"),
    Key("wall_s", None, "max", "all", "training time so far, evaluations excluded"),
    Key("peak_mem_mb", None, "max", "all", "peak memory of training so far"),
)
KEYS = {k.name: k for k in TABLE}
K = SimpleNamespace(**{k.name: k.name for k in TABLE})   # K.fwd_nfe == "fwd_nfe"


def over_batches(name: str) -> str:
    """How `name` is reduced over the steps of an interval or batches of an evaluation."""
    key = KEYS.get(name)
    return (key.batches if key else None) or "mean"


def over_ranks(name: str) -> str:
    """How `name` is merged over the ranks of torchrun."""
    key = KEYS.get(name)
    return key.ranks if key else "mean"


# The solver statistics an evaluation reports (eval's table and JSON, compare).
SOLVER = (K.fwd_nfe, K.fwd_nfe_max, K.fwd_abs_residual, K.fwd_abs_residual_max,
          K.fwd_rel_residual, K.fwd_rel_residual_max, K.fwd_converged)
