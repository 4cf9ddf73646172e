"""Implicit layers: the DEQ fixed-point layer, its solve settings and gradient rules."""

from .gradcheck import compare_to_unrolled, ift_vs_finite_differences
from .layer import (BACKWARD_MODES, DEQ, DEQInfo, adjoint_map, adjoint_solve, cell_map,
                    hutchinson_jacobian_sq)
from .spec import SolveSpec

__all__ = ["DEQ", "DEQInfo", "SolveSpec", "BACKWARD_MODES", "adjoint_map", "adjoint_solve",
           "cell_map", "hutchinson_jacobian_sq", "compare_to_unrolled",
           "ift_vs_finite_differences"]
