"""Implicit layers: the DEQ fixed-point layer, its solve settings and gradient rules."""

from .gradcheck import compare_to_unrolled, ift_vs_finite_differences
from .layer import DEQ, DEQInfo, adjoint_map, adjoint_solve, cell_map, hutchinson_jacobian_sq
from .settings import DEQSettings, deq_settings
from .spec import SolveSpec

__all__ = ["DEQ", "DEQInfo", "DEQSettings", "deq_settings", "SolveSpec", "adjoint_map",
           "adjoint_solve",
           "cell_map", "hutchinson_jacobian_sq", "compare_to_unrolled",
           "ift_vs_finite_differences"]
