"""The model registry: built-ins register here exactly as an installed package's models
(entry-point group `deqctl.models`) or a user's (`model.name: PATH.py:Class`) are found."""

from __future__ import annotations

import inspect
from typing import Any

from ..registry import PartError, Registry


def _is_model(obj: Any, ref: str) -> None:
    from .base import DEQModel
    if not (inspect.isclass(obj) and issubclass(obj, DEQModel)):
        raise PartError(f"{ref}: a model is a subclass of deqctl.DEQModel")
    missing = [m for m in ("inject", "cell", "decode")
               if getattr(obj, m) is getattr(DEQModel, m)]
    if missing or not obj.inputs or not obj.tasks:
        what = ", ".join([*(f"{m}()" for m in missing),
                          *(a for a in ("inputs", "tasks") if not getattr(obj, a))])
        raise PartError(f"{ref}: a DEQModel defines inject(), cell() and decode() and "
                        f"declares inputs and tasks; it lacks {what}")


MODELS = Registry("model", "model.name", "deqctl.models", check=_is_model)
