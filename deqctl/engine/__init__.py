"""Training, evaluation, checkpoints and metrics."""
