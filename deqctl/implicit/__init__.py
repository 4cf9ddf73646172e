"""Implicit layers: the DEQ fixed-point layer and its gradient rules."""

from .gradcheck import compare_to_unrolled, ift_vs_finite_differences
from .layer import DEQ, DEQInfo, adjoint_map, adjoint_solve, cell_map, hutchinson_jacobian_sq, run_solver

__all__ = ["DEQ", "DEQInfo", "adjoint_map", "adjoint_solve", "cell_map", "hutchinson_jacobian_sq", "run_solver",
           "compare_to_unrolled", "ift_vs_finite_differences"]
