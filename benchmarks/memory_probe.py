"""Peak memory of one meta-step, measured in a fresh process.

On CPU, freed memory normally stays in the process (glibc keeps it), so a resident-set reading inside a
long benchmark says little. This probe runs in its own process with ``MALLOC_MMAP_THRESHOLD_`` set, so
large buffers are returned to the system when freed and the resident set follows live memory; it reports
the peak resident set during one meta-step (after a warm-up step) minus the resident set before it.

    python -m benchmarks.memory_probe --ways 20 --shots 5 --queries 5 --tasks 16 --steps 5 --driver vmap \\
        --chunk-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def probe(ways: int, shots: int, queries: int, tasks: int, steps: int, first_order: bool, driver: str,
          conv: str = "native", chunk_size: int | None = None, device: str = "cpu") -> dict:
    """Peak memory and time of one meta-step: ``{"peak_mb": ..., "ms": ...}``.

    On CPU it runs this module in a subprocess; on CUDA the allocator's own peak counter is exact, so it
    measures in this process (and frees the cached blocks afterwards)."""
    if torch.device(device).type == "cuda":
        result = measure(ways, shots, queries, tasks, steps, first_order, driver, conv, chunk_size, device)
        torch.cuda.empty_cache()
        return result
    args = [sys.executable, "-m", "benchmarks.memory_probe", "--ways", str(ways), "--shots", str(shots),
            "--queries", str(queries), "--tasks", str(tasks), "--steps", str(steps), "--driver", driver,
            "--conv", conv, "--device", device]
    if first_order:
        args.append("--first-order")
    if chunk_size:
        args += ["--chunk-size", str(chunk_size)]
    root = str(Path(__file__).resolve().parents[1])  # benchmarks/ is importable from the repository root
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": path}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(ways: int, shots: int, queries: int, tasks: int, steps: int, first_order: bool, driver: str,
            conv: str = "native", chunk_size: int | None = None, device: str = "cpu") -> dict:
    """Peak memory above the starting point, and time, of one meta-step after a warm-up step."""
    from benchmarks.measure import PeakMemory, timed
    from benchmarks.meta_step import Setting, functorch_example, learn2learn_maml, ours, random_tasks
    from meta import build_model

    device = torch.device(device)
    s = Setting(ways, shots, queries, tasks, steps, first_order)
    model = build_model("conv4", s.ways, generator=torch.Generator().manual_seed(0)).to(device)
    batch = random_tasks(s, device, torch.Generator().manual_seed(0))
    if driver == "functorch":
        step = functorch_example(model, s, batch)
    elif driver == "learn2learn":
        step = learn2learn_maml(model, s, batch)
    else:
        step = ours(model, s, batch, driver, conv_impl=conv, chunk_size=chunk_size)
    step()  # warm-up (and the auto driver's one-time choice)
    with PeakMemory(device) as mem:
        seconds = timed(step, device)
    return {"peak_mb": mem.peak / 2**20, "ms": seconds * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("ways", "shots", "queries", "tasks", "steps"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--driver", required=True, help="a meta driver, functorch or learn2learn")
    parser.add_argument("--conv", default="native")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args()
    print(json.dumps(measure(a.ways, a.shots, a.queries, a.tasks, a.steps, a.first_order, a.driver, a.conv,
                             a.chunk_size, a.device)))


if __name__ == "__main__":
    main()
