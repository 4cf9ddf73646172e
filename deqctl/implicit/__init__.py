"""Implicit layers: the DEQ fixed-point layer and its gradient rules."""

from .gradcheck import compare_to_unrolled, ift_vs_finite_differences
from .layer import DEQ, DEQInfo, hutchinson_jacobian_sq, run_solver

__all__ = ["DEQ", "DEQInfo", "hutchinson_jacobian_sq", "run_solver", "compare_to_unrolled",
           "ift_vs_finite_differences"]
