"""deqctl: train, evaluate, inspect and export Deep Equilibrium Models."""

__version__ = "0.1.0"
