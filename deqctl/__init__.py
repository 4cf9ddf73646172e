"""deqctl: train, evaluate, inspect and export Deep Equilibrium Models."""

__version__ = "0.1.0"

__all__ = ["DEQ", "DEQModel", "DataInfo", "SolveSpec", "load", "CheckpointError",
           "__version__"]


def __getattr__(name: str):
    # Imported on first use: they pull in torch, which `import deqctl.recipe` (schema
    # checks, CLI start-up) should not pay for.
    if name == "load":
        from .api import load
        return load
    if name == "CheckpointError":      # what deqctl.load raises for any unusable file
        from .engine.checkpoint import CheckpointError
        return CheckpointError
    if name in ("DEQ", "SolveSpec"):
        from . import implicit
        return getattr(implicit, name)
    if name == "DEQModel":             # what a model of your own subclasses
        from .models import DEQModel
        return DEQModel
    if name == "DataInfo":             # what it is built for
        from .data import DataInfo
        return DataInfo
    raise AttributeError(f"module 'deqctl' has no attribute {name!r}")
