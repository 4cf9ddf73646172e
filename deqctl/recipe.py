"""Recipes: the typed schema, YAML loading, dotted overrides and the resolved dump.

Every block forbids unknown keys, and every error in a recipe is reported at once with
its dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SolverName = Literal["fixed_point", "anderson", "broyden"]
StopMode = Literal["abs", "rel"]


class RecipeError(ValueError):
    """A recipe or override a user wrote is invalid; str() is the full report."""


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- solver settings: one symmetric shape for forward, backward and eval -------------


class FixedPointKnobs(Block):
    damping: float = Field(1.0, gt=0, le=1, description="z <- z + damping * (f(z) - z)")


class AndersonKnobs(Block):
    m: int = Field(5, ge=1, description="history size")
    lam: float = Field(1e-4, ge=0, description="ridge, relative to the mean diagonal of the Gram matrix")
    beta: float = Field(1.0, gt=0, le=1, description="mixing between f-values and iterates")


class BroydenKnobs(Block):
    history: int = Field(8, ge=1, description="rank-one updates kept (limited memory)")
    line_search: bool = False
    ls_steps: int = Field(3, ge=1, description="step halvings tried by the line search")


class SolverSettings(Block):
    solver: SolverName = "anderson"
    max_iter: int = Field(30, ge=1)
    tol: float = Field(1e-3, gt=0)
    stop_mode: StopMode = "rel"
    check_every: int | None = Field(
        None, ge=1, description="read convergence back to the host every k iterations "
        "(None: every iteration on CPU, every 4 on accelerators)")
    compact: bool = Field(False, description="evaluate f only on unconverged samples "
                          "(needs a per-sample cell: no batch statistics)")
    fixed_point: FixedPointKnobs = FixedPointKnobs()
    anderson: AndersonKnobs = AndersonKnobs()
    broyden: BroydenKnobs = BroydenKnobs()

    def knobs(self) -> dict[str, Any]:
        """Keyword arguments for `deqctl.solvers.solve` (the chosen solver's own knobs)."""
        return {**getattr(self, self.solver).model_dump(),
                "check_every": self.check_every, "compact": self.compact}


class BackwardSettings(SolverSettings):
    mode: Literal["ift", "phantom", "jfb"] = "ift"
    solver: SolverName = "fixed_point"
    max_iter: int = Field(30, ge=1)
    tol: float = Field(1e-4, gt=0)
    phantom_steps: int = Field(5, ge=1, description="unrolled steps for mode=phantom")
    phantom_tau: float = Field(0.5, gt=0, le=1, description="damping for mode=phantom")


class EvalSettings(Block):
    """Test-time solve; unset fields inherit deq.forward."""

    solver: SolverName | None = None
    max_iter: int | None = Field(None, ge=1)
    tol: float | None = Field(None, gt=0)
    stop_mode: StopMode | None = None


class JacobianReg(Block):
    weight: float = Field(0.0, ge=0, description="weight of the Hutchinson ||df/dz||_F^2 loss")
    every: int = Field(1, ge=1, description="apply on every k-th training step")
    samples: int = Field(1, ge=1, description="Hutchinson probe vectors")


class FixedPointCorrection(Block):
    states: int = Field(0, ge=0, description="extra solver states supervised (0: off)")
    gamma: float = Field(0.8, gt=0, le=1, description="weight decay towards early states")


class DEQSettings(Block):
    forward: SolverSettings = SolverSettings()
    backward: BackwardSettings = BackwardSettings()
    eval: EvalSettings = EvalSettings()
    jacobian_reg: JacobianReg = JacobianReg()
    fp_correction: FixedPointCorrection = FixedPointCorrection()
    warm_start: bool = Field(False, description="start from z* of the previous batch "
                             "when shapes match (training only)")

    def eval_settings(self) -> SolverSettings:
        """The forward settings with deq.eval's fields applied on top."""
        overrides = {k: v for k, v in self.eval.model_dump().items() if v is not None}
        return self.forward.model_copy(update=overrides)


# --- the rest of the recipe ----------------------------------------------------------


class DataSettings(Block):
    name: str = "mnist-5k"
    root: str | None = Field(None, description="where torchvision/HF data lives")
    download: bool = False
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    augment: bool = Field(False, description="random crop (+ flip for natural images)")
    limit_train: int | None = Field(None, ge=1, description="use only the first N training samples")
    limit_eval: int | None = Field(None, ge=1, description="use only the first N eval samples")


class ModelSettings(Block):
    name: str = "resnet_deq"
    channels: int = Field(32, ge=1)
    inner_channels: int = Field(64, ge=1)
    groups: int = Field(4, ge=1, description="GroupNorm groups")
    stem_stride: int = Field(2, ge=1, description="downsampling of the stem")
    norm: Literal["weight", "spectral", "none"] = "weight"
    head_pool: int = Field(4, ge=1, description="head pools to head_pool x head_pool cells")
    init_std: float | None = Field(None, gt=0, description="N(0, std) init of cell convs")
    dropout: float = Field(0.0, ge=0, lt=1)


class OptimSettings(Block):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, description="sgd only")
    grad_clip: float | None = Field(1.0, gt=0)


class ScheduleSettings(Block):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class TrainSettings(Block):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps; wins over epochs")
    log_every: int = Field(20, ge=1)
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    eval_every_epoch: bool = True


class RuntimeSettings(Block):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    deterministic: bool = False


class Recipe(Block):
    name: str = "deq"
    seed: int = 0
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    deq: DEQSettings = DEQSettings()
    optim: OptimSettings = OptimSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    train: TrainSettings = TrainSettings()
    runtime: RuntimeSettings = RuntimeSettings()


# --- loading, overrides, dumping -----------------------------------------------------


def _describe(err: dict, model: type[BaseModel]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = _block_at(model, err["loc"][:-1])
        valid = ", ".join(parent.model_fields) if parent else "?"
        return f"{key}: unknown key (valid here: {valid})"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {err['msg']}{shown}"


def _block_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def validate(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Return the validated Recipe, or raise RecipeError listing every problem at once."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, Recipe) for e in exc.errors()]
        raise RecipeError(f"{source}: {len(lines)} error(s)\n  " + "\n  ".join(lines)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `key.sub=value` on the first '='; the value is read as a YAML scalar."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: expected key.sub=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `key.sub=value` applied (validation comes later)."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {'.'.join(path[:i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_raw(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict, with one-line errors for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise RecipeError(f"{p}: not valid YAML{where}") from None
    return raw or {}


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load, override and validate a recipe file."""
    return validate(apply_overrides(load_raw(path), list(overrides)), source=str(path))


def dump(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
