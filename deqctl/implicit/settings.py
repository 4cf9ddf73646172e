"""The DEQ layer's settings: the recipe's `deq` block and `deqctl.DEQ(**settings)` are the
same schema, validated once, in one place, with the rules that tie its parts together
(eval inherits forward, bf16_until above tol, what unrolled and SHINE allow).

Forward, backward and eval solves share one shape: solver, max_iter, tol, stop_mode,
check_every, compact, and one block of knobs per solver, named after it (`anderson:
{m, lam, beta}`), so switching `solver` never leaves a stray option behind. A solver named
by entry point or import path (`./mine.py:picard`) gets its own block (`picard: {...}`),
read from its signature.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
from pydantic import Field, ValidationInfo, create_model, field_validator, model_validator

from ..limits import ITER_LIMIT
from ..errors import quote
from ..options import Block, Bool, Float, Int, OptionsError, validate
from ..registry import Part, PartError, TrustError
from ..solvers import READOUT_MODES, SOLVERS, ReadoutStop, knob_block
from .spec import SolveSpec, bf16_problem

StopMode = Literal["abs", "rel"]
# test-time solves may also stop on the readout (solvers.tracker.ReadoutStop)
EvalStopMode = Literal["abs", "rel", "kl", "argmax"]


def knob_key(ref: str) -> str:
    """The block a solver's knobs live in: its short name, or the name after `:`."""
    return ref.rpartition(":")[2]


class SolverSettings(Block):
    """One solve. Subclasses built by `deq_schema` add a knob block per solver."""

    solver: str = "anderson"
    max_iter: Int = Field(30, ge=1, le=ITER_LIMIT)
    tol: Float = Field(1e-3, gt=0)
    stop_mode: StopMode = "rel"
    check_every: Int | None = Field(
        None, ge=1, description="read convergence back to the host every k iterations "
        "(None: every iteration on CPU, every 4 on accelerators)")
    compact: Bool = Field(False, description="evaluate f only on unconverged samples "
                          "(needs a per-sample cell: no batch statistics)")

    @field_validator("solver")
    @classmethod
    def _known(cls, v: str) -> str:
        return _known_solver(cls, v)

    @field_validator("stop_mode", mode="before")
    @classmethod
    def _residual_only(cls, v: Any) -> Any:
        if v in READOUT_MODES:
            raise ValueError(f"{v} stops on the model's readout, an inference stop: set "
                             f"deq.eval.stop_mode={v} (training and gradient solves stop "
                             f"on the residual: abs or rel)")
        return v

    def options(self) -> dict[str, Any]:
        """The chosen solver's own knobs (e.g. Anderson's m, lam, beta)."""
        return getattr(self, knob_key(self.solver)).model_dump()

    def spec(self) -> SolveSpec:
        """These settings as the SolveSpec the layer runs."""
        fn = type(getattr(self, knob_key(self.solver))).__solver__
        return SolveSpec(self.solver, self.max_iter, self.tol, self.stop_mode, self.options(),
                         self.check_every, self.compact, fn=fn)


class ForwardSettings(SolverSettings):
    bf16_until: Float | None = Field(
        None, gt=0, description="a mixed-precision solve: f under bf16 autocast until every "
        "running sample's residual is below this, then in full precision down to tol; for "
        "fp32 runs on hardware with fast bf16 (tensor cores, AMX)")

    @field_validator("bf16_until")
    @classmethod
    def _above_tol(cls, v: float | None, info: ValidationInfo) -> float | None:
        tol = info.data.get("tol")
        problem = bf16_problem(tol, v, "deq.forward.tol") if tol is not None else None
        if problem:
            raise ValueError(problem)
        return v

    def spec(self) -> SolveSpec:
        """As SolverSettings.spec, with bf16_until."""
        return super().spec().but(bf16_until=self.bf16_until)


class BackwardSettings(SolverSettings):
    mode: Literal["ift", "phantom", "jfb"] = "ift"
    solver: str = "fixed_point"
    tol: Float = Field(1e-4, gt=0)
    phantom_steps: Int = Field(5, ge=1, le=ITER_LIMIT, description="unrolled steps for mode=phantom")
    phantom_tau: Float = Field(0.5, gt=0, le=1, description="damping for mode=phantom")
    shine: Bool = Field(False, description="mode=ift with a broyden forward: start the "
                        "adjoint solve from the forward's inverse-Jacobian estimate (SHINE)")


class EvalSettings(Block):
    """Test-time solve; unset fields inherit deq.forward."""

    solver: str | None = None
    max_iter: Int | None = Field(None, ge=1, le=ITER_LIMIT)
    tol: Float | None = Field(None, gt=0)
    stop_mode: EvalStopMode | None = Field(
        None, description="abs or rel: stop on the residual; kl or argmax: also stop a "
        "sample once its prediction has settled (the residual's tolerance still stops it)")
    kl_tol: Float = Field(1e-4, gt=0, description="stop_mode=kl: stop a sample when "
                          "KL(before || now) of its predicted distribution between two "
                          "checks is below this, at every position")
    patience: Int = Field(4, ge=1, le=ITER_LIMIT, description="stop_mode=argmax: stop a "
                          "sample when its argmax is the same at this many checks in a row")

    @field_validator("solver")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        return v if v is None else _known_solver(cls, v)

    def readout_stop(self) -> ReadoutStop | None:
        """The readout rule of stop_mode kl or argmax (None: the residual alone)."""
        if self.stop_mode not in READOUT_MODES:
            return None
        return ReadoutStop(self.stop_mode, self.kl_tol, self.patience)


def _known_solver(cls: type[Block], v: str) -> str:
    """`v` if this schema has a knob block for it; ValueError listing the valid names."""
    if knob_key(v) not in getattr(cls, "__knobs__", set()):
        raise ValueError(f"unknown solver {quote(v)} (valid: {', '.join(SOLVERS.names())}, "
                         f"or an import path PATH.py:function)")
    return v


class JacobianReg(Block):
    weight: Float = Field(0.0, ge=0, description="weight of the Hutchinson ||df/dz||_F^2 loss")
    every: Int = Field(1, ge=1, description="apply on every k-th training step")
    samples: Int = Field(1, ge=1, le=100, description="Hutchinson probe vectors")


class FixedPointCorrection(Block):
    states: Int = Field(0, ge=0, le=100, description="extra solver states supervised (0: off)")
    gamma: Float = Field(0.8, gt=0, le=1, description="weight decay towards early states")


class UnrolledSettings(Block):
    depth: Int | None = Field(None, ge=1, le=ITER_LIMIT, description="applications of the "
                              "cell (None: deq.forward.max_iter)")


class RecurrentSettings(Block):
    depth: Float | None = Field(None, gt=0, le=ITER_LIMIT, description="mean applications "
                                "of the cell per training step (None: deq.forward.max_iter); "
                                "rounded, the test-time depth unless deq.eval.max_iter is set")
    distribution: Literal["fixed", "poisson-lognormal"] = Field(
        "fixed", description="fixed: every step applies the cell `depth` times; "
        "poisson-lognormal: each step draws tau ~ Normal(log(depth) - sigma^2/2, sigma), "
        "then Poisson(exp(tau)) applications, at least 1 (Huginn)")
    sigma: Float = Field(0.5, gt=0, description="spread of the log-normal rate "
                         "(poisson-lognormal)")
    backprop: Int | None = Field(None, ge=1, le=ITER_LIMIT, description="gradients through "
                                 "the last k applications only; the ones before run without "
                                 "a graph (None: through every application)")
    max_depth: Int | None = Field(None, ge=1, le=ITER_LIMIT, description="the most "
                                  "applications a step may draw")


class BaselineSettings(Block):
    width: Int = Field(64, ge=4, le=4096, description="GRU hidden size / CNN channels")
    layers: Int | None = Field(None, ge=1, le=16, description="GRU layers (default 1) / CNN "
                               "blocks (default 2; a block: two 3x3 convolutions, 2x2 pooling)")


class DEQSettings(Block):
    mode: Literal["implicit", "unrolled", "recurrent", "baseline"] = Field(
        "implicit", description="implicit: solve for the fixed point, implicit gradients; "
        "unrolled: the explicit twin, the same cell applied deq.unrolled.depth times with "
        "backprop through every application; recurrent: recurrent-depth training, the cell "
        "applied a number of times drawn per step (deq.recurrent), backprop through the "
        "last deq.recurrent.backprop of them; baseline: a standard explicit network of the "
        "task's kind in place of model.* (a GRU for sequences, a small CNN for images, a "
        "linear forecaster for series; deq.baseline), trained by the same loop")
    unrolled: UnrolledSettings = UnrolledSettings()
    baseline: BaselineSettings = BaselineSettings()
    forward: ForwardSettings = Field(default_factory=lambda: ForwardSettings())
    backward: BackwardSettings = Field(default_factory=lambda: BackwardSettings())
    eval: EvalSettings = EvalSettings()
    jacobian_reg: JacobianReg = JacobianReg()
    fp_correction: FixedPointCorrection = FixedPointCorrection()
    warm_start: Bool = Field(False, description="start from z* of the previous batch "
                             "when shapes match (training only)")
    cache_fixed_points: Bool = Field(False, description="start each training example's "
                                     "solve from its own z* of the previous epoch (kept "
                                     "on the device, saved in checkpoints)")
    pretrain_steps: Int = Field(0, ge=0, description="shallow pretraining: the first N "
                                "training steps train the cell unrolled (deq.unrolled.depth "
                                "applications, backprop through each), then implicitly")
    recurrent: RecurrentSettings = RecurrentSettings()

    @model_validator(mode="after")
    def _consistent(self) -> "DEQSettings":
        if self.mode != "implicit" and self.fp_correction.states:
            raise ValueError(f"fp_correction.states must be 0 with mode={self.mode} (an "
                             f"explicit network back-propagates through every state)")
        if self.pretrain_steps and self.mode != "implicit":
            raise ValueError(f"pretrain_steps must be 0 with mode={self.mode} (it trains an "
                             f"implicit model unrolled first; this one is explicit throughout)")
        if self.eval.tol is not None and self.eval_settings().bf16_until is not None:
            problem = bf16_problem(self.eval.tol, self.forward.bf16_until, "deq.eval.tol")
            if problem:       # the eval solve inherits bf16_until in the same measure
                raise ValueError(f"forward.bf16_until: {problem}")
        if self.mode == "recurrent":
            self._check_recurrent()
        if self.eval.stop_mode in READOUT_MODES and self.mode != "implicit":
            raise ValueError(f"eval.stop_mode={self.eval.stop_mode} stops a solve on its "
                             f"readout; mode={self.mode} applies its cell a set number of "
                             f"times, with no solve to stop (use abs or rel)")
        b = self.backward
        if b.shine and not (b.mode == "ift" and self.forward.solver == "broyden"
                            and not self.forward.compact):
            raise ValueError("backward.shine needs backward.mode=ift and forward.solver="
                             "broyden without compact (it reuses the forward Broyden's "
                             "inverse estimate)")
        return self

    def _check_recurrent(self) -> None:
        """ValueError naming the deq.recurrent key whose value the others rule out."""
        r, mean = self.recurrent, self.recurrent_mean
        named = f"recurrent.depth ({mean:g})" if r.depth is not None else \
            f"the depth (deq.forward.max_iter={mean:g}, recurrent.depth unset)"
        if r.distribution == "fixed" and mean != int(mean):
            raise ValueError(f"recurrent.depth must be a whole number with distribution=fixed "
                             f"(got {mean:g}; poisson-lognormal takes a mean)")
        if r.max_depth is not None and r.max_depth < mean:
            raise ValueError(f"recurrent.max_depth ({r.max_depth}) must be at least {named}")
        if r.backprop is not None and r.distribution == "fixed" and r.backprop > mean:
            raise ValueError(f"recurrent.backprop ({r.backprop}) must be at most {named}")
        if r.backprop is not None and r.max_depth is not None and r.backprop > r.max_depth:
            raise ValueError(f"recurrent.backprop ({r.backprop}) must be at most "
                             f"recurrent.max_depth ({r.max_depth})")

    @property
    def recurrent_mean(self) -> float:
        """Mean applications of the cell per training step in recurrent mode."""
        return self.recurrent.depth or float(self.forward.max_iter)

    def recurrent_depth(self, seed: int, step: int) -> int:
        """Applications of the cell at training step `step` in recurrent mode: the depth
        (fixed) or a Poisson-lognormal draw with that mean, between 1 and max_depth. A pure
        function of (seed, step): a resumed run draws what the run never stopped drew, and
        every rank of torchrun draws the same."""
        r, mean = self.recurrent, self.recurrent_mean
        cap = r.max_depth or ITER_LIMIT
        if r.distribution == "fixed":
            return int(mean)
        rng = np.random.default_rng((seed, step))
        tau = rng.normal(np.log(mean) - r.sigma ** 2 / 2, r.sigma)
        rate = np.exp(min(tau, np.log(cap)))      # a far tail would overflow Poisson
        return int(min(max(rng.poisson(rate), 1), cap))

    def eval_settings(self) -> ForwardSettings:
        """The forward settings with deq.eval's fields applied on top (bf16_until only in
        the forward's stop mode: it is a residual in that measure). A recurrent model's
        max_iter is its test-time depth: deq.eval.max_iter, else the rounded mean depth."""
        overrides = {k: v for k, v in self.eval.model_dump(exclude={"kl_tol", "patience"}).items()
                     if v is not None}
        if overrides.get("stop_mode") in READOUT_MODES:   # the residual's measure stays
            del overrides["stop_mode"]                     # the forward's (readout_stop())
        if self.mode == "recurrent" and "max_iter" not in overrides:
            overrides["max_iter"] = max(1, round(self.recurrent_mean))
        if overrides.get("stop_mode", self.forward.stop_mode) != self.forward.stop_mode:
            overrides["bf16_until"] = None
        return self.forward.model_copy(update=overrides)

    @property
    def explicit_depth(self) -> int:
        """Applications of the cell in an explicit mode: a baseline's cell is the whole
        network, applied once (models/baselines.py); a twin's (and shallow pretraining's) is
        deq.unrolled.depth."""
        return 1 if self.mode == "baseline" else self.unrolled.depth or self.forward.max_iter

    @property
    def fixed_depth(self) -> bool:
        """Whether the model answers with a set number of applications of its cell from its
        start (the twin, recurrent depth) rather than a solve for its fixed point: where it
        starts changes the answer, and its traces solve a cell it never solves itself."""
        return self.mode in ("unrolled", "recurrent")

    def describe_eval(self) -> str:
        """What answers at test time, for status lines: an implicit model's eval solver, an
        explicit twin's depth, or a baseline's single pass."""
        if self.mode == "baseline":
            return "explicit baseline, no solve"
        if self.mode == "unrolled":
            return f"explicit twin, depth {self.explicit_depth}"
        if self.mode == "recurrent":
            return f"recurrent depth, {self.eval_settings().max_iter} applications of its cell"
        rule = self.eval.readout_stop()
        readout = f", stops on its readout ({rule.describe()})" if rule else ""
        return f"eval solver {self.eval_settings().spec().describe()}{readout}"

    def specs(self) -> tuple[SolveSpec, SolveSpec, SolveSpec]:
        """(forward, backward, eval) as the layer runs them."""
        return self.forward.spec(), self.backward.spec(), self.eval_settings().spec()


def solver_refs(raw: Any) -> list[tuple[str, str]]:
    """(dotted key, name) of every solver a raw `deq` block names, defaults left out."""
    found = []
    if isinstance(raw, dict):
        for block in ("forward", "backward", "eval"):
            value = raw.get(block)
            if isinstance(value, dict) and isinstance(value.get("solver"), str):
                found.append((f"{block}.solver", value["solver"]))
    return found


def resolve_solvers(raw: Any, prefix: str = "", bases: Iterable[Path] = (),
                    trust: bool = True) -> tuple[dict[str, Part], list[str]]:
    """{key: part} of the non-built-in solvers a raw `deq` block names (imported), and one
    error line per name that does not resolve. TrustError for user code without `trust`."""
    parts, errors = {}, []
    for key, ref in solver_refs(raw):
        if ref in SOLVERS.builtins:
            continue
        try:
            parts[key] = SOLVERS.get(ref, bases, trust)
        except TrustError as exc:
            raise TrustError(f"{prefix}{key}: {exc}") from None
        except PartError as exc:
            errors.append(f"{prefix}{key}: {exc}")
    return parts, errors


@lru_cache(maxsize=64)
def deq_schema(extra: tuple[tuple[str, Any], ...] = ()) -> type[DEQSettings]:
    """DEQSettings with a knob block for every built-in solver and for each (name,
    function) of `extra`."""
    blocks = {name: knob_block(fn) for name, fn in
              [*((n, SOLVERS.get(n).obj) for n in SOLVERS.builtins), *extra]}
    knobs = {knob_key(ref): (block, Field(default_factory=block)) for ref, block in blocks.items()}
    names = set(knobs)

    def solve_block(base: type[Block], fields: dict) -> type[Block]:
        cls = create_model(base.__name__, __base__=base, **fields)
        cls.__knobs__ = names
        return cls

    fwd, bwd = solve_block(ForwardSettings, knobs), solve_block(BackwardSettings, knobs)
    ev = solve_block(EvalSettings, {})
    return create_model("DEQSettings", __base__=DEQSettings,
                        forward=(fwd, Field(default_factory=fwd)),
                        backward=(bwd, Field(default_factory=bwd)),
                        eval=(ev, Field(default_factory=ev)))


def schema_for(raw: Any, prefix: str = "", bases: Iterable[Path] = (), trust: bool = True
               ) -> tuple[type[DEQSettings], dict[str, Part], list[str]]:
    """The schema that validates the raw `deq` block `raw` (its solvers imported), the
    non-built-in solvers by key, and the error lines of names that do not resolve."""
    parts, errors = resolve_solvers(raw, prefix, bases, trust)
    extra = tuple(dict.fromkeys((p.ref, p.obj) for p in parts.values()))
    return deq_schema(extra), parts, errors


def deq_settings(raw: dict[str, Any] | None = None) -> DEQSettings:
    """Validate plain keyword arguments (the recipe's `deq` block as Python dicts);
    OptionsError listing every problem with its key."""
    raw = raw or {}
    schema, _, errors = schema_for(raw)
    if errors:
        raise OptionsError(errors)
    return validate(schema, raw)
