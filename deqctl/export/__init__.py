"""Deployment artefacts: fold normalisations, unroll the solver to a fixed number of
iterations, write safetensors / torch.export / ONNX, and check parity with the eager DEQ.

ONNX support is optional (`pip install 'deqctl[export]'`); nothing here imports onnx
until an ONNX export is asked for.
"""

from .fold import fold_norms
from .formats import ExportFailed, MissingDependency, require_onnx, write_onnx, write_pt2
from .parity import Parity, compare
from .unroll import UNROLLABLE, Unrolled, calibrate_iters

__all__ = ["fold_norms", "ExportFailed",
           "MissingDependency", "require_onnx", "write_onnx", "write_pt2", "Parity",
           "compare", "UNROLLABLE", "Unrolled", "calibrate_iters"]
