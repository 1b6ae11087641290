"""Side-by-side timing of meta-steps, per-sample gradients, memory and task sampling: measurement code used by
scripts/benchmark.py and the probes in experiments/benchmarks/, not part of the installed library (the wheel ships
``meta`` only). Run from the repository root (``python -m benchmarks.sampling``); scripts/benchmark.py puts the root
on ``sys.path`` itself."""
