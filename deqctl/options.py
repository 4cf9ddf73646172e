"""Settings blocks: strict scalars, a part's options read from its signature, and errors
that name the dotted key a user wrote.

Every block of a recipe and every part's options (a model's constructor, a solver's
knobs, a data function's arguments) go through here, so they are all equally strict: an
unknown key lists the accepted ones, a missing option is named, a wrong type names the
key, booleans are only true/false, integers never booleans, floats finite.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Any, Callable, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Interval
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError,
                      create_model)

from .errors import quote

INT_LIMIT = 2**31 - 1      # beyond this an integer setting is a typo, and overflows later


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


def _boolean(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {quote(value)}")
    return value


# Strict scalars: YAML reads `on`, `yes` and `true` as booleans, which pydantic would turn
# into 1 for an integer; a boolean is only true/false, an integer never a boolean, and
# floats are finite (Block forbids .inf and .nan).
Int = Annotated[int, BeforeValidator(_integer), AfterValidator(_int_range)]
Float = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, BeforeValidator(_boolean)]
_STRICT = {int: Int, float: Float, bool: Bool}

# Constrained option types for signatures (the built-in models use them; so may yours):
Count = Annotated[int, Ge(1)]                      # a size, a number of things: >= 1
Positive = Annotated[float, Gt(0)]
Rate = Annotated[float, Interval(ge=0, lt=1)]      # a dropout probability
Fraction = Annotated[float, Interval(gt=0, le=1)]


class Block(BaseModel):
    """A settings block: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              arbitrary_types_allowed=True)


def strict(annotation: Any) -> Any:
    """`annotation` with int, float and bool (wherever they appear: inside Annotated,
    unions, lists, tuples) replaced by their strict versions."""
    if annotation in _STRICT:
        return _STRICT[annotation]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return Annotated[(strict(args[0]), *annotation.__metadata__)]
    if origin in (Union, types.UnionType):
        return Union[tuple(strict(a) for a in args)]
    if origin in (list, tuple) and args:
        return origin[tuple(strict(a) if a is not Ellipsis else a for a in args)]
    return annotation


def parameters(fn: Callable, skip: int) -> list[inspect.Parameter]:
    """The options of `fn` (a function, or a class's constructor): its parameters after
    the first `skip` (self excluded), without *args and **kwargs."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def options_block(fn: Callable, skip: int, title: str, name: str | None = None,
                  base: type[Block] = Block, exclude: tuple[str, ...] = ()) -> type[Block]:
    """A Block whose fields are the options of `fn` (see `parameters`; `exclude`d ones
    left out: `base` declares them), typed by their annotations (untyped: anything) and
    defaulting to their defaults (none: required). With `name`, the block also has a
    `name` field that can only be `name`: what chose `fn` in the recipe."""
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn,
                                      include_extras=True)
    except Exception:            # an annotation that does not resolve: take them as written
        hints = {}
    fields: dict[str, Any] = {}
    if name is not None:
        fields["name"] = (Literal[name], name)
    for p in parameters(fn, skip):
        if p.name in exclude:
            continue
        annotation = hints.get(p.name, p.annotation)
        annotation = Any if annotation is inspect.Parameter.empty else strict(annotation)
        fields[p.name] = (annotation, ... if p.default is inspect.Parameter.empty else p.default)
    return create_model(title, __base__=base, **fields)


def tag_of(block: Any) -> str | None:
    """The name that chose a block (its `name` field's only value), or None."""
    field = getattr(block, "model_fields", {}).get("name")
    values = get_args(getattr(field, "annotation", None))
    return values[0] if len(values) == 1 else None


class OptionsError(ValueError):
    """Settings that do not validate; `lines` holds one line per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def error_lines(exc: ValidationError, schema: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per error of `exc`: the dotted key (`prefix` first) and what was expected."""
    return [_describe(e, schema, prefix) for e in exc.errors()]


def _describe(err: dict, schema: type[BaseModel], prefix: str) -> str:
    extra = err["type"] == "extra_forbidden"
    parts, block = _walk(schema, err["loc"][:-1] if extra else err["loc"])
    if extra:
        parts.append(str(err["loc"][-1]))
    key = ".".join([*([prefix] if prefix else []), *parts])
    if extra:
        valid = ", ".join(ordered(block.model_fields)) if block else "?"
        tag = tag_of(block)
        where = f" for {'.'.join([*([prefix] if prefix else []), *parts[:-1], 'name'])}={tag}" \
            if tag else ""
        return f"{key}: unknown key (valid{where}: {valid})"
    if err["type"] == "missing":
        return f"{key}: required (no default)"
    if err["type"] == "value_error":        # our own checks say what they got
        return f"{key}: {err['ctx']['error']}" if key else str(err["ctx"]["error"])
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {quote(got)})"
    return f"{key}: {err['msg']}{shown}"


def ordered(keys: Any) -> list[str]:
    """Keys with `name` first (a block chosen by name lists its shared keys first)."""
    keys = list(keys)
    return (["name"] if "name" in keys else []) + [k for k in keys if k != "name"]


def _walk(schema: Any, loc: tuple) -> tuple[list[str], Any]:
    """Follow an error location through nested blocks; returns (the key's parts, the
    block reached or None)."""
    parts: list[str] = []
    block: Any = schema
    for part in loc:
        parts.append(str(part))
        field = getattr(block, "model_fields", {}).get(str(part))
        ann = getattr(field, "annotation", None)
        block = next((a for a in (ann, *get_args(ann)) if isinstance(a, type)
                      and issubclass(a, BaseModel)), None)
    return parts, block


def validate(block: type[BaseModel], raw: Any, prefix: str = "") -> BaseModel:
    """`raw` validated as `block`; OptionsError with one dotted line per problem."""
    try:
        return block.model_validate(raw)
    except ValidationError as exc:
        raise OptionsError(error_lines(exc, block, prefix)) from None
