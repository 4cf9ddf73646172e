"""Documented upper bounds (docs/robustness.md, "Input limits"): a solve, unrolled twin or sweep
point of more iterations than these is a typo or a hostile file, and would run for days."""

ITER_LIMIT = 10_000        # max_iter, unrolled depth, phantom steps, --sweep-iters, ...
UNROLL_LIMIT = 1_000       # export --iters: every iteration is a copy of the cell in the graph
HISTORY_LIMIT = 256        # Anderson's m, Broyden's history: each a copy of the state
THREAD_LIMIT = 1024
