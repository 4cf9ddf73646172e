"""One registry per kind of part (models, solvers, data sources, optimisers): how a name in
a recipe becomes the class or function it means.

A name is one of
- a short name: a built-in (registered by the module that defines it, as a user's part
  would be) or an installed package's entry point (group `deqctl.models`, ...);
- an import path to user code: `PATH.py:Name` (a relative PATH is looked up in each of
  the caller's folders in turn: the recipe's, then the working directory) or
  `package.module:Name` (importable from the working directory, as torchtune's
  `_component_` is).

Importing user code runs it, so it needs `trust=True`: training from a recipe trusts what
the recipe names (its user chose to run it); opening a run, a checkpoint or an export needs
`--trust-code`. What was imported is recorded with the file's sha256, so a changed source
can be noticed later.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import quote


class PartError(ValueError):
    """A name that does not lead to a usable part; str() is one line (without the key)."""


class TrustError(PartError):
    """A name that is user code, to be imported only with --trust-code."""


@dataclass(frozen=True)
class Part:
    """What a name resolved to, and where it came from."""

    ref: str                       # as written in the recipe
    obj: Any
    origin: str                    # "built-in" | "entry point" | "user code"
    path: Path | None = None       # user code: the file imported (or the module's file)
    sha256: str | None = None      # ... and its content's hash

    @property
    def user_code(self) -> bool:
        return self.origin == "user code"

    def record(self) -> dict[str, str]:
        """What a run stores of user code, to find it again and notice a changed file."""
        return {"ref": self.ref, "path": str(self.path), "sha256": self.sha256 or ""}


def import_builtins(package: str, path: Iterable[str]) -> None:
    """Import every module of a package of parts (`package`, its `__path__`): a built-in
    registers itself when imported, so adding one is adding its module, nothing else."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")


def is_import_path(ref: str) -> bool:
    """True for `PATH.py:Name` and `package.module:Name` (user code), False for a short name."""
    return ":" in ref


class Registry:
    """Parts of one kind by name. `kind` ("model") and `key` ("model.name") word the
    errors; `group` is the entry-point group installed packages register in; `check`
    (optional) raises PartError for an object that is not a part of this kind."""

    def __init__(self, kind: str, key: str, group: str,
                 check: Callable[[Any, str], None] | None = None):
        self.kind, self.key, self.group, self.check = kind, key, group, check
        self._builtins: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: register a built-in part under `name`."""
        def add(obj: Any) -> Any:
            self.add(name, obj)
            return obj
        return add

    def add(self, name: str, obj: Any) -> None:
        if name in self._builtins:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._builtins[name] = obj

    @property
    def builtins(self) -> list[str]:
        """The built-in names, sorted (whatever order their modules were imported in)."""
        return sorted(self._builtins)

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        found = importlib.metadata.entry_points(group=self.group)
        return {ep.name: ep for ep in found if ep.name not in self._builtins}

    def names(self) -> list[str]:
        """Every short name: the built-ins, then installed packages' entry points."""
        return [*self.builtins, *sorted(self._entry_points())]

    def get(self, ref: str, bases: Iterable[Path] = (), trust: bool = True) -> Part:
        """The part `ref` names; PartError (TrustError for user code without `trust`)."""
        if not isinstance(ref, str) or not ref:
            raise PartError(f"expected a name or an import path, got {quote(ref)}")
        if not is_import_path(ref):
            if ref in self._builtins:
                return Part(ref, self._builtins[ref], "built-in")
            eps = self._entry_points()
            if ref not in eps:
                raise PartError(f"unknown {self.kind} {quote(ref)} (valid: "
                                f"{', '.join(self.names())}, or an import path "
                                f"PATH.py:Name / package.module:Name)")
            try:
                obj = eps[ref].load()
            except Exception as exc:
                raise PartError(f"{self.kind} {ref!r} (entry point {eps[ref].value}) does not "
                                f"load: {_first_line(exc)}") from None
            return self._checked(Part(ref, obj, "entry point"))
        where, _, attr = ref.rpartition(":")
        if not where or not attr.isidentifier():
            raise PartError(f"{quote(ref)}: expected PATH.py:Name or package.module:Name")
        if not trust:
            raise TrustError(f"{quote(ref)} is user code, and opening it would import "
                             f"(run) it: add --trust-code if you trust it "
                             f"(trust_code=True in Python)")
        module, path = (_import_file(where, bases) if _is_file(where)
                        else _import_module(where))
        if not hasattr(module, attr):
            raise PartError(f"{quote(ref)}: {path or where} defines no {attr!r}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path else None
        return self._checked(Part(ref, getattr(module, attr), "user code", path, digest))

    def _checked(self, part: Part) -> Part:
        if self.check is not None:
            self.check(part.obj, part.ref)
        return part


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:160]}"


def _import_file(where: str, bases: Iterable[Path]) -> tuple[Any, Path]:
    """Import the file `where` (relative: looked up in each of `bases`, then the working
    directory) under a name of its own; returns (module, its resolved path)."""
    given = Path(where).expanduser()
    candidates = [given] if given.is_absolute() else [Path(b) / given for b in bases] + [given]
    path = next((c.resolve() for c in candidates if c.is_file()), None)
    if path is None:
        looked = ", ".join(dict.fromkeys(str(c.parent.resolve()) for c in candidates))
        raise PartError(f"{where}: no such file (looked in {looked})")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    name = f"deqctl_user.{path.stem}_{digest}"
    if name in sys.modules:       # imported once per process: one class, one identity
        return sys.modules[name], path
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PartError(f"importing {path} failed: {_first_line(exc)}") from None
    return module, path


def _import_module(where: str) -> tuple[Any, Path | None]:
    """Import `package.module` with the working directory on the path."""
    added = "" not in sys.path and "." not in sys.path
    if added:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(where)
    except ModuleNotFoundError as exc:
        raise PartError(f"{where}: no such module ({exc.name} not found)") from None
    except Exception as exc:
        raise PartError(f"importing {where} failed: {_first_line(exc)}") from None
    finally:
        if added:
            sys.path.remove("")
    file = getattr(module, "__file__", None)
    return module, Path(file).resolve() if file else None
