"""Side-by-side timing of meta-steps and per-sample gradients (used by scripts/benchmark.py)."""
