"""deqctl: train, evaluate, inspect and export Deep Equilibrium Models."""

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def __getattr__(name: str):
    # `deqctl.load` is imported on first use: it pulls in torch and the model zoo, which
    # `import deqctl.recipe` (schema checks, CLI start-up) should not pay for.
    if name == "load":
        from .api import load
        return load
    raise AttributeError(f"module 'deqctl' has no attribute {name!r}")
