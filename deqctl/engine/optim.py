"""The optimiser registry: built-ins register here exactly as an installed package's
(entry-point group `deqctl.optimizers`) or a user's (`optim.name: torch.optim:RMSprop`,
`PATH.py:make`) are found. An optimiser is a callable `(params, lr, **options)` returning
a torch.optim.Optimizer; its other keyword arguments are the `optim` block's options."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge
from pydantic import Field

from ..options import Block, Float, Fraction, options_block
from ..registry import Part, Registry

OPTIMIZERS = Registry("optimizer", "optim.name", "deqctl.optimizers")
NonNegative = Annotated[float, Ge(0)]
Betas = tuple[Fraction, Fraction]


class OptimBase(Block):
    """Keys every optimiser takes: the learning rate (the schedule scales it) and the
    gradient-norm clip applied before each step."""

    lr: Float = Field(2e-3, gt=0)
    grad_clip: Float | None = Field(1.0, gt=0)


@OPTIMIZERS.register("adamw")
def adamw(params, lr: float, betas: Betas = (0.9, 0.999), weight_decay: NonNegative = 0.0,
          eps: Annotated[float, Ge(0)] = 1e-8) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


@OPTIMIZERS.register("adam")
def adam(params, lr: float, betas: Betas = (0.9, 0.999), weight_decay: NonNegative = 0.0,
         eps: Annotated[float, Ge(0)] = 1e-8) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


@OPTIMIZERS.register("sgd")
def sgd(params, lr: float, momentum: NonNegative = 0.9, weight_decay: NonNegative = 0.0,
        nesterov: bool = False) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov)


_BLOCKS: dict[tuple[str, int], type[Block]] = {}


def optim_block(part: Part) -> type[Block]:
    """The `optim` block of a recipe choosing `part`: name, lr, grad_clip and its options."""
    key = (part.ref, id(part.obj))
    if key not in _BLOCKS:
        block = options_block(part.obj, 1, f"optim {part.ref}", name=part.ref,
                              base=OptimBase, exclude=("lr",))
        block.__optimizer__ = part.obj
        _BLOCKS[key] = block
    return _BLOCKS[key]


def build_optimizer(params, cfg: Any) -> torch.optim.Optimizer:
    """The optimiser the validated `optim` block names, at its base learning rate."""
    options = {k: getattr(cfg, k) for k in type(cfg).model_fields
               if k not in ("name", "grad_clip", "lr")}
    return type(cfg).__optimizer__(params, lr=cfg.lr, **options)
