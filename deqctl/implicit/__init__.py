"""Implicit layers: the DEQ fixed-point layer and its gradient rules."""

from .layer import DEQ, DEQInfo, hutchinson_jacobian_sq, run_solver

__all__ = ["DEQ", "DEQInfo", "hutchinson_jacobian_sq", "run_solver"]
