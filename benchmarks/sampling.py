"""Task-sampling throughput: ``python -m benchmarks.sampling [--device cuda]``.

Uses a synthetic pool shaped like Omniglot training with rotations as classes (4,800 classes x 20 drawings,
28x28) unless ``--omniglot`` is given (then the real training split is loaded).
"""

from __future__ import annotations

import argparse
import time

import torch

from meta.data.pool import ClassPool, synthetic_pool
from meta.data.sampler import TaskSampler


def measure(pool: ClassPool, ways: int, shots: int, queries: int, batch: int,
            device: str, seconds: float = 2.0) -> float:
    """Tasks per second for batches of ``batch`` tasks."""
    sampler = TaskSampler(pool, ways, shots, queries, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(3):
        sampler.sample(batch, g)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        out = sampler.sample(batch, g)
        n += batch
    if out.support_x.is_cuda:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Print tasks/second for 5w1s/1q and 20w5s/15q, batches of 32 tasks."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--omniglot", action="store_true", help="use the real train split")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.omniglot:
        from meta.data.omniglot import load_omniglot

        pool = load_omniglot(None, "train")
    else:
        pool = synthetic_pool(4800, 20, 28, seed=0)
    print(f"pool: {pool.num_classes} classes x {pool.max_drawings} drawings, "
          f"device={args.device}, torch threads={torch.get_num_threads()}")
    for ways, shots, queries in ((5, 1, 1), (20, 5, 15)):
        rate = measure(pool, ways, shots, queries, args.batch, args.device, args.seconds)
        print(f"{ways}-way {shots}-shot {queries}-query, batch {args.batch}: "
              f"{rate:,.0f} tasks/s ({rate / args.batch:,.1f} batches/s)")


if __name__ == "__main__":
    main()
