"""Recipes: the schema, YAML loading, dotted overrides and the resolved dump.

The schema lists no models, data sources, solvers or optimisers: the blocks chosen by
name (`model`, `data`, `optim`, each solve's knob block) are built from the registries,
from the chosen part's own settings or signature, when a recipe is validated. Every block
forbids unknown keys, and every error in a recipe is reported at once with its dotted key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, PrivateAttr, ValidationError, create_model

from .errors import quote
from .files import FileRefused, read_text
from .limits import THREAD_LIMIT
from .options import Block, Bool, Float, Int, _integer, error_lines, ordered
from .registry import Part, PartError, Registry, TrustError
from .yamlio import MAX_BYTES, YamlError, load_yaml

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class RecipeError(ValueError):
    """A recipe or override a user wrote is invalid; str() is the full report."""


class RecipeTrustError(RecipeError):
    """A recipe (inside a run, checkpoint or export) names user code, and the caller did
    not choose to trust it."""


def _plain_name(value: str) -> str:
    if not re.fullmatch(NAME_PATTERN, value):
        raise ValueError(f"expected a plain name (letters, digits, '-', '_' and '.', "
                         f"starting with a letter or digit; it names runs/NAME-TIME), got "
                         f"{quote(value)}")
    return value


# --- the sections every recipe has --------------------------------------------------------


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


def _wandb_project(value: str) -> str:
    # W&B refuses / \ # ? % : and over 128 characters itself, but only once RUN/wandb is
    # written; '..' is refused as well, so the name never reads as a path
    bad = any(c in "/\\#?%:" for c in value) or ".." in value
    if bad or not value.strip() or len(value) > 128 or not value.isprintable():
        raise ValueError(f"expected a W&B project name (1 to 128 printable characters, "
                         f"none of / \\ # ? % : and no '..'), got {quote(value)}")
    return value


class LogSettings(Block):
    """Trackers beside metrics.jsonl, each logging its rows' numbers (deqctl.engine.trackers)."""
    tensorboard: Bool = Field(False, description="also write every metrics row as TensorBoard "
                              "scalars into RUN/tensorboard (pip install 'deqctl[tensorboard]')")
    mlflow: Bool = Field(False, description="also log every metrics row to MLflow "
                         "(pip install 'deqctl[mlflow]')")
    mlflow_uri: str | None = Field(None, description="the MLflow store (default: "
                                   "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    wandb: Bool = Field(False, description="also log every metrics row to Weights & Biases "
                        "into RUN/wandb (pip install 'deqctl[wandb]')")
    wandb_project: Annotated[str, AfterValidator(_wandb_project)] = Field(
        "deqctl", description="the W&B project: a name, never a path")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: nothing leaves the machine until `wandb sync`")
    group: str | None = Field(None, description="the MLflow experiment and W&B group "
                              "(default: 'deqctl', no group); a sweep sets its folder's name")


class RuntimeSettings(Block):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast of the model's forward (bf16 | fp16, fp16 with a "
        "gradient scaler); solver state, residuals and the adjoint solve stay float32")
    compile: Bool = Field(False, description="torch.compile the cell (checkpoints unchanged)")
    threads: Int | None = Field(None, ge=1, le=THREAD_LIMIT, description="torch intra-op threads")
    deterministic: Bool = False


# the parts chosen by name, and their defaults when a recipe leaves `name` out
DEFAULT_NAMES = {"data": "mnist-5k", "model": "resnet_deq", "optim": "adamw"}


class Recipe(Block):
    """A validated recipe. `model`, `data`, `optim` and `deq` are blocks of the parts the
    recipe chose (see `schema`); `part(kind)` is what each name resolved to."""

    name: Annotated[str, AfterValidator(_plain_name)] = Field(
        "deq", description="a plain name (letters, digits, -_.): runs/NAME-TIME, never a path")
    seed: Annotated[int, BeforeValidator(_integer)] = Field(0, ge=0, lt=2**63)
    data: Any = None
    model: Any = None
    deq: Any = None
    optim: Any = None
    schedule: ScheduleSettings = ScheduleSettings()
    train: TrainSettings = TrainSettings()
    log: LogSettings = LogSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    _parts: dict[str, Part] = PrivateAttr(default_factory=dict)

    def part(self, kind: str) -> Part:
        """What `model`, `data` or `optim` names (`kind` "model" is key "model.name")."""
        return self._parts[f"{kind}.name"]

    def user_code(self) -> dict[str, Part]:
        """The parts this recipe imports from user code, by the key that names them."""
        return {key: p for key, p in self._parts.items() if p.user_code}


# --- the schema, built from the registries -------------------------------------------------


def _registries() -> dict[str, tuple[Registry, Any]]:
    """{section: (registry, block maker)} of the sections chosen by name. Imported here:
    models pull in torch, which a schema-free import of this module should not pay for."""
    from .data import SOURCES, data_block
    from .engine.optim import OPTIMIZERS, optim_block
    from .models import MODELS, model_block
    return {"model": (MODELS, model_block), "data": (SOURCES, data_block),
            "optim": (OPTIMIZERS, optim_block)}


def _resolve(raw: dict[str, Any], bases: Iterable[Path], trust: bool
             ) -> tuple[dict[str, Part], dict[str, Any], Any, list[str]]:
    """Resolve every name the raw recipe chooses; returns (parts by key, the blocks of the
    named sections, the deq schema, error lines of names that do not resolve)."""
    from .implicit.settings import schema_for

    parts, blocks, errors = {}, {}, []
    for section, (registry, make) in _registries().items():
        block = raw.get(section)
        name = block.get("name") if isinstance(block, dict) else DEFAULT_NAMES[section]
        try:
            part = registry.get(name, bases, trust)
        except TrustError as exc:
            raise RecipeTrustError(f"{section}.name: {exc}") from None
        except PartError as exc:
            errors.append(f"{section}.name: {exc}")
            continue
        parts[f"{section}.name"], blocks[section] = part, make(part)
    deq_raw = raw.get("deq") if isinstance(raw.get("deq"), dict) else {}
    try:
        deq, solvers, deq_errors = schema_for(deq_raw, "deq.", bases, trust)
    except TrustError as exc:
        raise RecipeTrustError(str(exc)) from None
    parts.update({f"deq.{key}": part for key, part in solvers.items()})
    return parts, blocks, deq, errors + deq_errors


_SCHEMAS: dict[tuple[int, ...], type[Recipe]] = {}


def schema(blocks: dict[str, Any], deq: Any) -> type[Recipe]:
    """The Recipe class whose `model`, `data` and `optim` are the given blocks (a section
    whose name did not resolve takes anything, so the rest is still checked) and whose
    `deq` is the given deq schema."""
    key = (id(deq), *(id(blocks.get(section)) for section in DEFAULT_NAMES))
    if key not in _SCHEMAS:
        fields = {section: (blocks[section], Field(default_factory=blocks[section]))
                  if section in blocks else (dict[str, Any], Field(default_factory=dict))
                  for section in DEFAULT_NAMES}
        _SCHEMAS[key] = create_model("Recipe", __base__=Recipe,
                                     deq=(deq, Field(default_factory=deq)), **fields)
    return _SCHEMAS[key]


def validate(raw: dict[str, Any], source: str = "recipe", bases: Iterable[Path] = (),
             trust: bool = True) -> Recipe:
    """Return the validated Recipe, or raise RecipeError listing every problem at once.

    The names of parts are resolved through the registries first: user code is imported
    only with `trust` (else RecipeTrustError, naming the key), a relative PATH.py is
    looked up in each of `bases`, then the working directory.
    """
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    raw = _with_default_names(raw)
    parts, blocks, deq, lines = _resolve(raw, list(bases), trust)
    cls = schema(blocks, deq)
    try:
        recipe = cls.model_validate(raw)
    except ValidationError as exc:
        named = {line.split(":", 1)[0] for line in lines}     # reported as they resolved
        lines += [e for e in error_lines(exc, cls) if e.split(":", 1)[0] not in named]
        recipe = None
    if lines:
        raise RecipeError(f"{source}: {len(lines)} error(s)\n  " + "\n  ".join(lines))
    recipe._parts = parts
    return recipe


def _with_default_names(raw: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for section, name in DEFAULT_NAMES.items():
        block = out.get(section)
        if isinstance(block, dict) and "name" not in block:
            out[section] = {"name": name, **block}
    return out


# --- loading, overrides, dumping -----------------------------------------------------


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

    An override of `data.name` (or `model.name`, `optim.name`) that switches the block to
    another part drops the old block's own keys unless an override sets them: what suited
    one source or model means nothing to the next. Kept are the keys every part of the
    kind takes (batch sizes and limits; lr and grad_clip) and, between sources of one
    family, the family's (text: tokenizer, seq_len; series: window, horizon, season and
    the split fractions), so a recipe moves to other data of its kind by data.* alone.
    """
    out = _copy_tree(raw) if raw is not None else {}
    if not isinstance(out, dict):
        raise RecipeError(f"expected a mapping of sections (name, data, model, ...), got "
                          f"{type(out).__name__}")
    given: set[tuple[str, ...]] = set()
    switched: dict[str, tuple[Any, Any]] = {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {quote(text)}: {'.'.join(path[:i + 1])} is not a "
                                  f"section")
            node = child
        if len(path) == 2 and path[0] in DEFAULT_NAMES and path[1] == "name":
            before = node.get("name", DEFAULT_NAMES[path[0]])
            if before != value:
                switched[path[0]] = (switched.get(path[0], (before,))[0], value)
        node[path[-1]] = value
        given.add(tuple(path))
    for section, (old, new) in switched.items():
        block = out.get(section)
        # another name for the same part (a short name, its import path) is no switch
        if isinstance(block, dict) and not _same_part(section, old, new):
            kept = _kept_keys(section, old, new)
            set_now = {path[1] for path in given if path[0] == section and len(path) > 1}
            for key in [k for k in block if k != "name" and k not in kept and k not in set_now]:
                del block[key]
    return out


def _kept_keys(section: str, old: Any, new: Any) -> set[str]:
    """The keys a `section` block keeps when its name switches from `old` to `new`."""
    from .data import DataBase
    from .data.settings import Forecasting, TextTokens
    from .engine.optim import OptimBase
    if section == "model":
        return set()
    if section == "optim":
        return set(OptimBase.model_fields)
    registry, make = _registries()["data"]
    try:
        a, b = (make(registry.get(n, (), False)) for n in (old, new))
    except (PartError, TypeError):
        return set(DataBase.model_fields)
    family = next((f for f in (TextTokens, Forecasting) if issubclass(a, f) and issubclass(b, f)),
                  DataBase)
    return set(family.model_fields)


def _same_part(section: str, old: Any, new: Any) -> bool:
    """Whether two names give one part. The old name is resolved only if that imports
    nothing untrusted (it came from a file); the new one was typed by the user, who is
    about to import it anyway."""
    registry = _registries().get(section, (None,))[0]
    if registry is None or not (isinstance(old, str) and isinstance(new, str)):
        return False
    try:
        return registry.get(old, (), False).obj is registry.get(new, (), True).obj
    except (PartError, TypeError, ValueError, OSError):
        return False


def _copy_tree(node: Any) -> Any:
    """A copy of nested dicts and lists sharing nothing: a YAML alias shares one object
    between two places, and an override of one must not change the other."""
    if isinstance(node, dict):
        return {k: _copy_tree(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy_tree(v) for v in node]
    return node


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """A recipe stored by an earlier version as this version reads it: every data block
    once carried `root` and `download`, and the optim block every optimiser's keys
    (betas and momentum); keys of those kinds the chosen part does not take are dropped."""
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    for section, stale in (("data", ("root", "download")), ("optim", ("betas", "momentum"))):
        block = raw.get(section)
        if not isinstance(block, dict):
            continue
        registry, make = _registries()[section]
        try:
            takes = make(registry.get(block.get("name", DEFAULT_NAMES[section]), (), False)).model_fields
        except PartError:
            continue          # user code or an unknown name: validation reports it
        raw[section] = {k: v for k, v in block.items() if k in takes or k not in stale}
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
    """Load, override and validate a recipe file; what it names by import path is looked
    up beside it first, and imported (a recipe its user runs is trusted)."""
    return validate(apply_overrides(load_raw(path), list(overrides)), source=str(path),
                    bases=[Path(path).parent])


def dump(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default written out, `name` first in
    each block)."""
    def order(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: order(node[k]) for k in ordered(node)}
        return node
    return yaml.safe_dump(order(recipe.model_dump(mode="json")), sort_keys=False)


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as {dotted.key: value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
