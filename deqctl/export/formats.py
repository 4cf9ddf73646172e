"""Writing an unrolled model as a torch.export program (.pt2) or ONNX graph, and running
each artefact back for the parity check.

The input's batch dimension is dynamic in both, so the artefact takes any batch size;
so is the sequence length of models that allow it (`dynamic_length`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

Runner = Callable[[torch.Tensor], torch.Tensor]
EXTRA_HINT = "pip install 'deqctl[export]'"


class MissingDependency(RuntimeError):
    """An optional package the requested format needs is not installed; str() is one line."""


class ExportFailed(RuntimeError):
    """The exporter could not trace or translate the model; str() says which and why."""


def require_onnx() -> None:
    """Raise MissingDependency naming the extra when onnx, onnxscript or onnxruntime is missing."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"ONNX export needs {', '.join(missing)}: {EXTRA_HINT}")


def _dynamic(length: bool) -> dict[int, torch.export.Dim]:
    dims = {0: torch.export.Dim("batch", min=1, max=1 << 20)}
    if length:
        dims[1] = torch.export.Dim("length", min=2, max=1 << 16)
    return dims


def _example(x: torch.Tensor) -> torch.Tensor:
    # A batch of 1 would let the tracer specialise on it; any size >= 2 keeps it symbolic.
    return x[:2] if x.shape[0] >= 2 else x.expand(2, *x.shape[1:]).contiguous()


def trace(module: nn.Module, example: torch.Tensor, dynamic_length: bool = False
          ) -> torch.export.ExportedProgram:
    """Return `module` captured by torch.export with a dynamic batch dimension (and a
    dynamic axis 1, the sequence length, when `dynamic_length`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (_example(example),),
                                       dynamic_shapes={"x": _dynamic(dynamic_length)})
    except Exception as exc:  # the exporter raises many types; all mean "cannot trace"
        raise ExportFailed(f"torch.export failed: {str(exc).splitlines()[0]}") from exc


def write_pt2(module: nn.Module, example: torch.Tensor, path: Path,
              dynamic_length: bool = False) -> Runner:
    """Export `module` with torch.export to `path`; return a runner of the saved program."""
    torch.export.save(trace(module, example, dynamic_length), str(path))
    loaded = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return loaded(x)
    return run


def write_onnx(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
               output_name: str, dynamic_length: bool = False) -> Runner:
    """Export `module` to ONNX (torch's dynamo exporter) at `path`; return an
    onnxruntime runner of the written file."""
    require_onnx()
    import onnxruntime as ort

    program = trace(module, example, dynamic_length)
    try:
        # The exporter narrates every stage on stdout: silence it. optimize=False skips
        # onnxscript's graph optimiser, which takes minutes on an unrolled graph of
        # ~1000 nodes; onnxruntime applies the same folding when it loads the model.
        # external_data=False keeps the weights inside the one .onnx file.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(program, (_example(example),), str(path), dynamo=True,
                              input_names=[input_name], output_names=[output_name],
                              optimize=False, external_data=False, verbose=False)
    except Exception as exc:
        raise ExportFailed(f"ONNX export failed: {str(exc).splitlines()[0]}") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3   # errors only: its constant-folding notes are not ours
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])
    return run
