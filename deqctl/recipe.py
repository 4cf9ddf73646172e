"""Recipes: the typed schema, YAML loading, dotted overrides and the resolved dump.

Every block forbids unknown keys, and every error in a recipe is reported at once with
its dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      ValidationError, ValidationInfo, field_validator, model_validator)

from .errors import quote
from .files import FileRefused, read_text
from .yamlio import MAX_BYTES, YamlError, load_yaml

if TYPE_CHECKING:
    from .implicit.spec import SolveSpec

SolverName = Literal["fixed_point", "anderson", "broyden"]
StopMode = Literal["abs", "rel"]


class RecipeError(ValueError):
    """A recipe or override a user wrote is invalid; str() is the full report."""


INT_LIMIT = 2**31 - 1      # beyond this an integer setting is a typo, and overflows later
# Documented upper bounds: a solve, unrolled twin or sweep point of more iterations is a
# typo (or a hostile checkpoint), and would run for days. The README lists them.
ITER_LIMIT = 10_000        # max_iter, unrolled depth, phantom steps, --sweep-iters, ...
UNROLL_LIMIT = 1_000       # export --iters: every iteration is a copy of the cell in the graph
HISTORY_LIMIT = 100        # Anderson's m, Broyden's history (each a copy of the state)
THREAD_LIMIT = 1024
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


def _integer(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {str(value).lower()}")
    return value


def _int_range(value: int) -> int:
    if abs(value) > INT_LIMIT:
        raise ValueError(f"{value} is too large (at most {INT_LIMIT})")
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def _plain_name(value: str) -> str:
    if not re.fullmatch(NAME_PATTERN, value):
        raise ValueError(f"expected a plain name (letters, digits, '-', '_' and '.', "
                         f"starting with a letter or digit; it names runs/NAME-TIME), got "
                         f"{quote(value)}")
    return value


def _boolean(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {quote(value)}")
    return value


# Strict scalars for every setting: YAML reads `on`, `yes` and `true` as booleans, which
# pydantic would turn into 1 for an integer; a boolean is only true/false, an integer never
# a boolean, and floats are finite (no .inf, .nan: Block forbids them).
Int = Annotated[int, BeforeValidator(_integer), AfterValidator(_int_range)]
Float = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, BeforeValidator(_boolean)]


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --- solver settings: one symmetric shape for forward, backward and eval -------------


class FixedPointKnobs(Block):
    damping: Float = Field(1.0, gt=0, le=1, description="z <- z + damping * (f(z) - z)")


class AndersonKnobs(Block):
    m: Int = Field(5, ge=1, le=HISTORY_LIMIT, description="history size")
    lam: Float = Field(1e-4, ge=0, description="ridge, relative to the mean diagonal of the Gram matrix")
    beta: Float = Field(1.0, gt=0, le=1, description="mixing between f-values and iterates")


class BroydenKnobs(Block):
    history: Int = Field(8, ge=1, le=HISTORY_LIMIT, description="rank-one updates kept (limited memory)")
    line_search: Bool = False
    ls_steps: Int = Field(3, ge=1, le=60, description="step halvings tried by the line search")


class SolverSettings(Block):
    solver: SolverName = "anderson"
    max_iter: Int = Field(30, ge=1, le=ITER_LIMIT)
    tol: Float = Field(1e-3, gt=0)
    stop_mode: StopMode = "rel"
    check_every: Int | None = Field(
        None, ge=1, description="read convergence back to the host every k iterations "
        "(None: every iteration on CPU, every 4 on accelerators)")
    compact: Bool = Field(False, description="evaluate f only on unconverged samples "
                          "(needs a per-sample cell: no batch statistics)")
    fixed_point: FixedPointKnobs = FixedPointKnobs()
    anderson: AndersonKnobs = AndersonKnobs()
    broyden: BroydenKnobs = BroydenKnobs()

    def options(self) -> dict[str, Any]:
        """The chosen solver's own knobs (e.g. Anderson's m, lam, beta)."""
        return getattr(self, self.solver).model_dump()

    def spec(self) -> "SolveSpec":
        """These settings as the DEQ layer's SolveSpec."""
        from .implicit.spec import SolveSpec   # torch: not imported for a schema check
        return SolveSpec(self.solver, self.max_iter, self.tol, self.stop_mode,
                         self.options(), self.check_every, self.compact)


class ForwardSettings(SolverSettings):
    bf16_until: Float | None = Field(
        None, gt=0, description="a mixed-precision solve: f under bf16 autocast until every "
        "running sample's residual is below this, then in full precision down to tol; for "
        "fp32 runs on hardware with fast bf16 (tensor cores, AMX)")

    @field_validator("bf16_until")
    @classmethod
    def _above_tol(cls, v: float | None, info: ValidationInfo) -> float | None:
        tol = info.data.get("tol")
        if v is not None and tol is not None and v <= tol:
            raise ValueError(f"must be above tol ({tol:g}): bf16 is only for the early "
                             f"iterations")
        return v

    def spec(self) -> "SolveSpec":
        """As SolverSettings.spec, with bf16_until while it is above tol (an override such
        as an eval or trace tolerance may have moved tol past it)."""
        above = self.bf16_until is not None and self.bf16_until > self.tol
        return super().spec().but(bf16_until=self.bf16_until if above else None)


class BackwardSettings(SolverSettings):
    mode: Literal["ift", "phantom", "jfb"] = "ift"
    solver: SolverName = "fixed_point"
    max_iter: Int = Field(30, ge=1, le=ITER_LIMIT)
    tol: Float = Field(1e-4, gt=0)
    phantom_steps: Int = Field(5, ge=1, le=ITER_LIMIT, description="unrolled steps for mode=phantom")
    phantom_tau: Float = Field(0.5, gt=0, le=1, description="damping for mode=phantom")
    shine: Bool = Field(False, description="mode=ift with a broyden forward: start the "
                        "adjoint solve from the forward's inverse-Jacobian estimate (SHINE)")


class EvalSettings(Block):
    """Test-time solve; unset fields inherit deq.forward."""

    solver: SolverName | None = None
    max_iter: Int | None = Field(None, ge=1, le=ITER_LIMIT)
    tol: Float | None = Field(None, gt=0)
    stop_mode: StopMode | None = None


class JacobianReg(Block):
    weight: Float = Field(0.0, ge=0, description="weight of the Hutchinson ||df/dz||_F^2 loss")
    every: Int = Field(1, ge=1, description="apply on every k-th training step")
    samples: Int = Field(1, ge=1, le=HISTORY_LIMIT, description="Hutchinson probe vectors")


class FixedPointCorrection(Block):
    states: Int = Field(0, ge=0, le=HISTORY_LIMIT, description="extra solver states supervised (0: off)")
    gamma: Float = Field(0.8, gt=0, le=1, description="weight decay towards early states")


class UnrolledSettings(Block):
    depth: Int | None = Field(None, ge=1, le=ITER_LIMIT, description="applications of the cell "
                              "(None: deq.forward.max_iter)")


class DEQSettings(Block):
    mode: Literal["implicit", "unrolled"] = Field(
        "implicit", description="implicit: solve for the fixed point, implicit gradients; "
        "unrolled: the explicit twin, the same cell applied deq.unrolled.depth times with "
        "backprop through every application")
    unrolled: UnrolledSettings = UnrolledSettings()
    forward: ForwardSettings = ForwardSettings()
    backward: BackwardSettings = BackwardSettings()
    eval: EvalSettings = EvalSettings()
    jacobian_reg: JacobianReg = JacobianReg()
    fp_correction: FixedPointCorrection = FixedPointCorrection()
    warm_start: Bool = Field(False, description="start from z* of the previous batch "
                             "when shapes match (training only)")
    cache_fixed_points: Bool = Field(False, description="start each training example's "
                                     "solve from its own z* of the previous epoch (kept "
                                     "on the device, saved in checkpoints)")

    def eval_settings(self) -> ForwardSettings:
        """The forward settings with deq.eval's fields applied on top (bf16_until only in
        the forward's stop mode: it is a residual in that measure)."""
        overrides = {k: v for k, v in self.eval.model_dump().items() if v is not None}
        if overrides.get("stop_mode", self.forward.stop_mode) != self.forward.stop_mode:
            overrides["bf16_until"] = None
        return self.forward.model_copy(update=overrides)

    def layer_kwargs(self) -> dict[str, Any]:
        """This block as keyword arguments of `deqctl.DEQ` (the recipe is one adapter onto
        the layer, which knows nothing of recipes)."""
        f, b, e = self.forward, self.backward, self.eval_settings()
        return dict(
            solver=f.solver, max_iter=f.max_iter, tol=f.tol, stop_mode=f.stop_mode,
            solver_options=f.options(), check_every=f.check_every, compact=f.compact,
            bf16_until=f.bf16_until,
            backward=b.mode, backward_solver=b.solver, backward_max_iter=b.max_iter,
            backward_tol=b.tol, backward_stop_mode=b.stop_mode, backward_options=b.options(),
            phantom_steps=b.phantom_steps, phantom_tau=b.phantom_tau, shine=b.shine,
            eval_solver=e.solver, eval_max_iter=e.max_iter, eval_tol=e.tol,
            eval_stop_mode=e.stop_mode, eval_options=e.options(),
            jacobian_reg=self.jacobian_reg.weight, jacobian_every=self.jacobian_reg.every,
            jacobian_samples=self.jacobian_reg.samples, fp_correction=self.fp_correction.states,
            fp_gamma=self.fp_correction.gamma, mode=self.mode,
            unrolled_depth=self.unrolled.depth)


# --- data: one block per source, chosen by data.name ----------------------------------


class DataBase(Block):
    """Keys every data source takes."""

    batch_size: Int = Field(64, ge=1)
    eval_batch_size: Int = Field(500, ge=1)
    limit_train: Int | None = Field(None, ge=1, description="use only the first N training samples")
    limit_eval: Int | None = Field(None, ge=1, description="use only the first N eval samples")


class Augmentable(DataBase):
    augment: Bool = Field(False, description="random shifts (+ flips for natural images)")


class Mnist5kData(Augmentable):
    """The embedded 4000/1000-digit MNIST subset (offline)."""

    name: Literal["mnist-5k"]


class SequentialMnistData(Augmentable):
    """The embedded MNIST subset read as 28 rows of 28 pixels: a sequence classification task."""

    name: Literal["sequential-mnist"]


class TorchvisionData(Augmentable):
    name: Literal["mnist", "fashion-mnist", "cifar10"]
    root: str | None = Field(None, description="where the files live (default ~/.cache/deqctl/data)")
    download: Bool = False


class ImageFolderData(Augmentable):
    """root/train/<class>/*.png|jpg, root/test/<class>/..., optional root/val/."""

    name: Literal["imagefolder"]
    root: str | None = None
    image_size: Int | None = Field(None, ge=4, description="resize to this square size "
                                   "(needed when image sizes differ)")


class TextTokens(DataBase):
    tokenizer: Literal["char", "byte"] = "char"
    seq_len: Int = Field(128, ge=2, description="tokens per training sequence (context length)")


class ShakespeareData(TextTokens):
    """The embedded Shakespeare corpus (train / valid / test plays), char level."""

    name: Literal["shakespeare"]


class TextFiles(Block):
    train: str | None = None
    val: str | None = None
    test: str | None = None


class TextData(TextTokens):
    """Local UTF-8 text files, read through Hugging Face datasets' "text" builder."""

    name: Literal["text"]
    files: TextFiles = TextFiles()
    root: str | None = Field(None, description="datasets cache directory")


class NpzData(Augmentable):
    """data.path: arrays x, y, x_test, y_test (optional x_val, y_val)."""

    name: Literal["npz"]
    path: str | None = None
    layout: Literal["auto", "sequence", "image"] = Field(
        "auto", description="how to read a 3-d float x: (N, L, C) sequences (auto) or "
        "(N, H, W) images")


class Forecasting(DataBase):
    window: Int = Field(104, ge=2, description="past steps the model sees")
    horizon: Int = Field(52, ge=1, description="future steps it predicts")
    season: Int = Field(52, ge=1, description="period of the seasonal-naive baseline")
    val_fraction: Float = Field(0.0, ge=0, lt=1, description="chronological, before test")
    test_fraction: Float = Field(0.2, gt=0, lt=1, description="the last part of the series")


class Co2Data(Forecasting):
    """The embedded weekly Mauna Loa CO2 series, 1958-2001 (real gaps)."""

    name: Literal["co2"]


class CsvData(Forecasting):
    name: Literal["csv"]
    path: str | None = None
    time_column: str | None = Field(None, description="dates or plain numbers (rows are "
                                    "sorted by it); None keeps the file's row order")
    columns: list[str] = Field(default_factory=list, description="target columns to forecast")

    @field_validator("columns", mode="before")
    @classmethod
    def _one_column(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v   # data.columns=co2 on the command line


class HfSource(Block):
    path: str | None = Field(None, description="hub name (e.g. wikitext) or a folder "
                             "written by save_to_disk")
    config: str | None = None
    train_split: str = "train"
    val_split: str | None = None
    test_split: str = "test"
    text_column: str | None = Field(None, description="a text dataset: its column")
    image_column: str | None = Field(None, description="an image dataset: its columns")
    label_column: str | None = None


class HfData(TextTokens):
    """Any Hugging Face dataset: text (language modelling) or image + label (classification)."""

    name: Literal["hf"]
    hf: HfSource = HfSource()
    root: str | None = Field(None, description="datasets cache directory")
    image_size: Int | None = Field(None, ge=4)
    augment: Bool = False


DataSettings = Annotated[
    Union[Mnist5kData, SequentialMnistData, TorchvisionData, ImageFolderData,
          ShakespeareData, TextData, NpzData, Co2Data, CsvData, HfData],
    Field(discriminator="name")]


# --- models: one block per architecture, chosen by model.name --------------------------


class ResNetDEQSettings(Block):
    """DEQ-ResNet image classifier (stem -> one residual cell solved to equilibrium -> head)."""

    name: Literal["resnet_deq"]
    channels: Int = Field(32, ge=1)
    inner_channels: Int = Field(64, ge=1)
    groups: Int = Field(4, ge=1, description="GroupNorm groups")
    stem_stride: Int = Field(2, ge=1, description="downsampling of the stem")
    norm: Literal["weight", "spectral", "none"] = "weight"
    head_pool: Int = Field(4, ge=1, description="head pools to head_pool x head_pool cells")
    init_std: Float | None = Field(None, gt=0, description="N(0, std) init of cell convs")
    dropout: Float = Field(0.0, ge=0, lt=1)


class MDEQSettings(Block):
    """Multiscale DEQ image classifier: 2-4 resolution branches solved jointly."""

    name: Literal["mdeq"]
    channels: list[Int] = Field([24, 48], min_length=2, max_length=4,
                                description="channels per branch, finest first; branch i "
                                "runs at 1/2^i of the stem's resolution")
    expansion: Int = Field(2, ge=1, description="inner channels of each branch's block")
    groups: Int = Field(4, ge=1, description="GroupNorm groups")
    stem_stride: Int = Field(1, ge=1)
    norm: Literal["weight", "spectral", "none"] = "weight"
    init_std: Float | None = Field(None, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    head_width: Int = Field(128, ge=1)

    @field_validator("channels")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(c < 1 for c in v):
            raise ValueError("every branch needs at least one channel")
        return v


class SequenceHead(Block):
    pool: Literal["mean", "last", "flatten"] = Field(
        "mean", description="classify / forecast: how the sequence's states become one "
        "vector (flatten: all positions, fixed length; causal forecasts default to last)")
    window_norm: Literal["none", "last", "last_std"] = Field(
        "last", description="forecast: read each continued channel relative to the "
        "window's last value (last), also in units of the window's spread (last_std, as "
        "RevIN), and predict in the same frame; none: the data's global scale only")


class TransformerDEQSettings(Block):
    """DEQ-Transformer: self-attention + feed-forward cell with input injection."""

    name: Literal["transformer_deq"]
    d_model: Int = Field(128, ge=8)
    heads: Int = Field(4, ge=1)
    d_ff: Int = Field(256, ge=8, description="feed-forward hidden width")
    norm_placement: Literal["pre", "post"] = "post"
    causal: Bool | None = Field(None, description="None: causal for lm and forecast, "
                                "bidirectional for classify")
    norm: Literal["weight", "spectral", "none"] = "weight"
    init_std: Float | None = Field(None, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    head: SequenceHead = SequenceHead()


class TcnDEQSettings(Block):
    """TrellisNet-style DEQ: a weight-tied causal temporal convolution with LSTM gating."""

    name: Literal["tcn_deq"]
    channels: Int = Field(128, ge=4, description="hidden channels (the state holds h and c)")
    kernel_size: Int = Field(2, ge=1, description="causal kernel over time")
    norm: Literal["weight", "spectral", "none"] = "weight"
    init_std: Float | None = Field(None, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    head: SequenceHead = SequenceHead()


ModelSettings = Annotated[Union[ResNetDEQSettings, MDEQSettings, TransformerDEQSettings,
                                TcnDEQSettings], Field(discriminator="name")]


# --- the rest of the recipe ----------------------------------------------------------


class OptimSettings(Block):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: Float = Field(2e-3, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    betas: tuple[Float, Float] = (0.9, 0.999)
    momentum: Float = Field(0.9, ge=0, description="sgd only")
    grad_clip: Float | None = Field(1.0, gt=0)


class ScheduleSettings(Block):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: Int = Field(50, ge=0)
    min_lr_ratio: Float = Field(0.0, ge=0, le=1)


class TrainSettings(Block):
    epochs: Int = Field(1, ge=1)
    max_steps: Int | None = Field(None, ge=1, description="stop after N optimizer steps; wins over epochs")
    log_every: Int = Field(20, ge=1)
    save_every: Int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    eval_every_epoch: Bool = True
    eval_every: Int = Field(0, ge=0, description="also evaluate every N steps (0: never); "
                            "time-to-target measurements need it finer than an epoch")


class LogSettings(Block):
    tensorboard: Bool = Field(False, description="also write every metrics row as TensorBoard "
                              "scalars into RUN/tensorboard (pip install 'deqctl[tensorboard]')")


class RuntimeSettings(Block):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast of the model's forward (bf16 | fp16, fp16 with a "
        "gradient scaler); solver state, residuals and the adjoint solve stay float32")
    compile: Bool = Field(False, description="torch.compile the cell (checkpoints unchanged)")
    threads: Int | None = Field(None, ge=1, le=THREAD_LIMIT, description="torch intra-op threads")
    deterministic: Bool = False


# defaults of the two blocks chosen by name, applied when a recipe leaves `name` out
DEFAULT_NAMES = {"data": "mnist-5k", "model": "resnet_deq"}


class Recipe(Block):
    name: Annotated[str, AfterValidator(_plain_name)] = Field(
        "deq", description="a plain name (letters, digits, -_.): runs/NAME-TIME, never a path")
    seed: Annotated[int, BeforeValidator(_integer)] = Field(0, ge=0, lt=2**63)
    data: DataSettings = Mnist5kData(name="mnist-5k")
    model: ModelSettings = ResNetDEQSettings(name="resnet_deq")
    deq: DEQSettings = DEQSettings()
    optim: OptimSettings = OptimSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    train: TrainSettings = TrainSettings()
    log: LogSettings = LogSettings()
    runtime: RuntimeSettings = RuntimeSettings()

    @model_validator(mode="before")
    @classmethod
    def _default_names(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for section, name in DEFAULT_NAMES.items():
                block = raw.get(section)
                if isinstance(block, dict) and "name" not in block:
                    raw = {**raw, section: {"name": name, **block}}
        return raw


# --- loading, overrides, dumping -----------------------------------------------------


def _describe(err: dict, model: type[BaseModel]) -> str:
    """One line for one pydantic error: the dotted key as the user wrote it (a union's tag
    left out) and what was expected there."""
    extra = err["type"] == "extra_forbidden"
    parts, block, tag = _walk(model, err["loc"][:-1] if extra else err["loc"])
    if extra:
        parts.append(str(err["loc"][-1]))
    key = ".".join(parts)
    if extra:
        valid = ", ".join(_ordered(block.model_fields)) if block else "?"
        where = f"for {'.'.join(parts[:-1] + ['name'])}={tag}" if tag else "here"
        return f"{key}: unknown key (valid {where}: {valid})"
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        ctx = err.get("ctx") or {}
        got = f"unknown {quote(ctx['tag'])}" if "tag" in ctx else "missing"
        return f"{key}.name: {got} (valid: {ctx.get('expected_tags') or _tags(block)})"
    if err["type"] == "value_error":        # our own checks say what they got
        return f"{key}: {err['ctx']['error']}"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {quote(got)})"
    return f"{key}: {err['msg']}{shown}"


def _ordered(keys: Any) -> list[str]:
    """Keys with `name` first: blocks chosen by name inherit their shared keys, which
    pydantic lists before the block's own."""
    keys = list(keys)
    return (["name"] if "name" in keys else []) + [k for k in keys if k != "name"]


def _union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """{tag: block} of a union discriminated on `name`; empty for any other annotation."""
    members = {}
    for arg in get_args(annotation):
        for cls in get_args(arg) or (arg,):
            name = getattr(cls, "model_fields", {}).get("name")
            for tag in get_args(getattr(name, "annotation", None)):
                members[tag] = cls
    return members


def _tags(block: Any) -> str:
    return ", ".join(repr(t) for t in _union_members(block)) if block else "?"


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list[str], Any, str | None]:
    """Follow an error location through the schema; returns (the key's parts without union
    tags, the block reached or None, the union tag of the innermost block or None)."""
    parts: list[str] = []
    block: Any = model
    tag = None
    i = 0
    while i < len(loc):
        part = str(loc[i])
        parts.append(part)
        field = getattr(block, "model_fields", {}).get(part)
        ann = getattr(field, "annotation", None)
        members = _union_members(ann) if field is not None else {}
        if members and i + 1 < len(loc) and str(loc[i + 1]) in members:
            tag = str(loc[i + 1])
            block, i = members[tag], i + 2
            continue
        if members:
            block = ann           # a union (its tag is the error)
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            block, tag = ann, None
        else:
            block = None
        i += 1
    return parts, block, tag


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
        raise RecipeError(f"override {quote(text)}: expected key.sub=value")
    try:
        parsed = load_yaml(value) if value.strip() else None
    except YamlError as exc:
        if "not valid YAML" not in str(exc):      # a bound broken, not just a plain string
            raise RecipeError(f"override {quote(text)}: {exc}") from None
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `key.sub=value` applied (validation comes later).

    An override of `data.name` (or `model.name`) moves the block to another source: the
    keys the old block had that the new one does not take are dropped, unless an override
    sets them, so a recipe moves to other data by `data.*` overrides alone.
    """
    out = _copy_tree(raw)
    given: set[tuple[str, ...]] = set()
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {quote(text)}: {'.'.join(path[:i + 1])} is not a "
                                  f"section")
            node = child
        node[path[-1]] = value
        given.add(tuple(path))
    for section in DEFAULT_NAMES:
        if (section, "name") in given:
            _keep_keys_of_new_block(out, section, lambda key: (section, key) in given)
    return out


def _copy_tree(node: Any) -> Any:
    """A copy of nested dicts and lists sharing nothing: a YAML alias shares one object
    between two places, and an override of one must not change the other."""
    if isinstance(node, dict):
        return {k: _copy_tree(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy_tree(v) for v in node]
    return node


def _keep_keys_of_new_block(raw: dict[str, Any], section: str, keep) -> None:
    """Drop keys of raw[section] that the block its `name` chooses does not take (and
    `keep(key)` does not protect); unknown names are left for validation to report."""
    block = raw.get(section)
    if not isinstance(block, dict):
        return
    members = _union_members(Recipe.model_fields[section].annotation)
    name = block.get("name", DEFAULT_NAMES[section])
    cls = members.get(name) if isinstance(name, str) else None
    if cls is None:           # validation reports the name
        return
    for key in [k for k in block if k not in cls.model_fields and not keep(k)]:
        del block[key]


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """A recipe stored by an earlier version as this version reads it: before data blocks
    were chosen by name, every data block carried `root` and `download`, which most
    sources do not take."""
    data = raw.get("data") if isinstance(raw, dict) else None
    if isinstance(data, dict):
        _keep_keys_of_new_block(raw, "data", lambda key: key not in ("root", "download"))
    return raw


def load_raw(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict, with one-line errors for missing, malformed, too
    large or hostile files (see deqctl.yamlio for the bounds)."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        return parse(read_text(p, MAX_BYTES), str(p))
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not a text (UTF-8) file; a recipe is YAML") from None
    except FileRefused as exc:
        raise RecipeError(str(exc)) from None
    except OSError as exc:
        raise RecipeError(f"{p}: cannot read the recipe ({exc.strerror or exc})") from None


def parse(text: str, source: str) -> dict[str, Any]:
    """The recipe in YAML `text` as a dict (empty for an empty document); RecipeError
    naming `source` for invalid YAML, duplicate keys or a bound broken."""
    try:
        raw = load_yaml(text)
    except YamlError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return {} if raw is None else raw


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load, override and validate a recipe file."""
    return validate(apply_overrides(load_raw(path), list(overrides)), source=str(path))


def dump(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default written out, `name` first in
    each block)."""
    def order(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: order(node[k]) for k in _ordered(node)}
        return node
    return yaml.safe_dump(order(recipe.model_dump(mode="json")), sort_keys=False)
