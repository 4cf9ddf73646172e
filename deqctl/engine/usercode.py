"""User code a run was trained with: what a checkpoint records of it, where to find it
again, and the one-line warning when its source has changed since.

A record is {"ref": as the recipe names it, "path": the file imported, "sha256": of its
content}, one per recipe key (`model.name`, `deq.forward.solver`, ...), in meta.json (and
in a safetensors export's header)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..registry import Part


class CodeChanged(UserWarning):
    """The user code a run names is not the file it was trained with."""


def records(user_code: dict[str, Part]) -> dict[str, dict[str, str]]:
    """What a checkpoint stores of the user code a recipe imported."""
    return {key: part.record() for key, part in user_code.items()}


def bases(stored: Any) -> list[Path]:
    """The folders the recorded files were imported from: where a relative PATH.py of
    the stored recipe is looked for first (then the working directory)."""
    if not isinstance(stored, dict):
        return []
    paths = [r.get("path") for r in stored.values() if isinstance(r, dict)]
    return [Path(p).parent for p in paths if isinstance(p, str) and p]


def check(user_code: dict[str, Part], stored: Any, where: Path) -> None:
    """Warn (CodeChanged, one line each) when a user-code part's source differs from the
    file the run recorded, or when the run recorded none."""
    stored = stored if isinstance(stored, dict) else {}
    for key, part in user_code.items():
        record = stored.get(key) if isinstance(stored.get(key), dict) else None
        if record is None:
            warnings.warn(f"{where}: {key}={part.ref} was not recorded when the run was "
                          f"saved; {part.path} may not be the code it was trained with",
                          CodeChanged, stacklevel=2)
        elif part.sha256 and record.get("sha256") != part.sha256:
            warnings.warn(f"{where}: {key}={part.ref}: {part.path} has changed since the run "
                          f"was trained (sha256 {str(record.get('sha256'))[:12]} then, "
                          f"{part.sha256[:12]} now); the model may not load or behave as "
                          f"trained", CodeChanged, stacklevel=2)
