"""Throughput of distributed meta-training: tasks/s for P processes x T threads, and the all-reduce share of a step.

    python scripts/benchmark_distributed.py                                # 1x2, 1x1, 2x1 on this CPU, 5w1s MAML
    python scripts/benchmark_distributed.py --configs 1x1,2x1,4x1 --steps 30 --repeats 5 preset=maml_omniglot_20w1s
    python scripts/benchmark_distributed.py --configs 1x1 device=cuda      # one GPU; 2x1 needs two GPUs (NCCL)

Each configuration "PxT" runs P processes (through torchrun when P > 1) with T torch threads each; every step is
a full training step of scripts/train_maml.py's loop: sample the global meta-batch, each rank's share's
meta-gradient, the bucketed all-reduce (P > 1), the optimizer step. Configurations run interleaved, --repeats
times each, each time in fresh processes; per run, the median step time after --warmup steps. Reported: median
tasks/s over runs, speed-up over the first configuration, and for P > 1 the all-reduce share of a step: the
median time inside ``all_reduce`` (which includes waiting for the slowest rank) and the same buffer reduced alone
after a barrier (the pure communication). Data default to the synthetic set (anything runs anywhere); pass
``data.dataset=omniglot`` for the real one. Any key=value goes to the config (meta/training/config.py).
Writes --out (default runs/benchmark/distributed.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = ["preset=maml_omniglot_5w1s", "data.dataset=synthetic", "data.synthetic_classes=64", "device=cpu",
            "driver=vmap_autograd", "progress=false"]


def worker(overrides: list[str], steps: int, warmup: int, threads: int) -> None:
    """One run (this process is one rank): time ``warmup + steps`` training steps; rank 0 prints a RESULT line."""
    import torch
    import torch.distributed as dist

    from meta.training.builders import build_learner, build_optimizer, build_samplers, resolve_device, resolve_dtype
    from meta.training.config import load_config
    from meta.training.distributed import DistributedMetaStep, init_distributed, rank_device

    torch.set_num_threads(threads)
    cfg = load_config([*DEFAULTS, *overrides])
    ctx = init_distributed(cfg.dist.timeout_s, cuda=resolve_device(cfg.device).type == "cuda")
    device, dtype = rank_device(resolve_device(cfg.device), ctx), resolve_dtype(cfg.dtype)
    sampler = build_samplers(cfg, device)["train"]
    learner = build_learner(cfg, dtype, device)
    optimizer = build_optimizer(cfg, learner)
    if ctx.world > 1:
        meta_step = DistributedMetaStep(learner, optimizer, ctx, driver=cfg.driver, chunk_size=cfg.train.chunk_size,
                                        signals=[])
    else:
        def meta_step(tasks):
            return learner.train_step(optimizer, tasks, driver=cfg.driver, chunk_size=cfg.train.chunk_size)
    reduce_seconds: list[float] = []
    all_reduce, sizes = dist.all_reduce, []

    def timed_all_reduce(tensor, **kwargs):  # the collective inside the step, waiting for the slowest rank included
        start = time.perf_counter()
        work = all_reduce(tensor, **kwargs)
        reduce_seconds.append(time.perf_counter() - start)
        sizes.append((tensor.numel(), tensor.dtype))
        return work

    dist.all_reduce = timed_all_reduce

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    generator = torch.Generator().manual_seed(cfg.seed)
    step_seconds = []
    for _ in range(warmup + steps):
        sync()
        start = time.perf_counter()
        batch = sampler.sample(cfg.train.meta_batch, generator)
        meta_step((batch.support_x.to(dtype), batch.support_y, batch.query_x.to(dtype), batch.query_y))
        sync()
        step_seconds.append(time.perf_counter() - start)
    dist.all_reduce = all_reduce
    alone = []
    if ctx.world > 1:  # the same buffer reduced with nothing else to wait for
        numel, buffer_dtype = sizes[-1]
        buffer = torch.zeros(numel, dtype=buffer_dtype, device=device)
        for _ in range(steps):
            dist.barrier()
            sync()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            sync()
            alone.append(time.perf_counter() - start)
    if ctx.is_main:
        step = statistics.median(step_seconds[warmup:])
        print("RESULT " + json.dumps({
            "step_s": step, "tasks_per_s": cfg.train.meta_batch / step,
            "all_reduce_s": statistics.median(reduce_seconds[warmup:]) if reduce_seconds else 0.0,
            "all_reduce_alone_s": statistics.median(alone) if alone else 0.0,
            "buffer_elements": sizes[-1][0] if sizes else 0, "meta_batch": cfg.train.meta_batch,
            "driver": cfg.driver, "device": str(device)}), flush=True)
    ctx.close()


def launch(config: str, overrides: list[str], args: argparse.Namespace) -> dict:
    """One run of configuration ``PxT`` in fresh processes; rank 0's RESULT."""
    processes, threads = (int(n) for n in config.split("x"))
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *runner, __file__, "--worker", "--threads", str(threads), "--steps",
                           str(args.steps), "--warmup", str(args.warmup), *overrides], env=env, cwd=REPO,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"configuration {config} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1x2,1x1,2x1",
                        help="comma list of PROCESSESxTHREADS (default 1x2,1x1,2x1)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, interleaved (default 3)")
    parser.add_argument("--out", default="runs/benchmark/distributed.json", help="JSON output")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args([a for a in sys.argv[1:] if a not in overrides])
    if args.worker:
        return worker(overrides, args.steps, args.warmup, args.threads)
    configs = args.configs.split(",")
    bad = [c for c in configs if len(c.split("x")) != 2 or not all(n.isdigit() and int(n) > 0 for n in c.split("x"))]
    if bad or min(args.steps, args.repeats) < 1 or args.warmup < 0:
        sys.exit(f"argument error: --configs takes PROCESSESxTHREADS items such as 2x1 (got {bad}); --steps and "
                 f"--repeats must be positive, --warmup >= 0")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for config in configs:
            runs[config].append(launch(config, overrides, args))
            print(f"repeat {repeat + 1}/{args.repeats} {config}: {runs[config][-1]['tasks_per_s']:.1f} tasks/s",
                  flush=True)
    rows = []
    for config in configs:
        median = {k: statistics.median(r[k] for r in runs[config])
                  for k in ("tasks_per_s", "step_s", "all_reduce_s", "all_reduce_alone_s")}
        rows.append({"config": config, **median, "runs": runs[config]})
    base = rows[0]["tasks_per_s"]
    print(f"\n{' '.join(DEFAULTS + overrides)}; medians of {args.repeats} runs x {args.steps} steps\n")
    print("| processes x threads | tasks/s | vs " + configs[0] + " | step ms | all-reduce ms (share) "
          "| all-reduce alone ms (share) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        share = row["all_reduce_s"] / row["step_s"]
        alone = row["all_reduce_alone_s"] / row["step_s"]
        print(f"| {row['config']} | {row['tasks_per_s']:.1f} | {row['tasks_per_s'] / base:.2f} | "
              f"{1000 * row['step_s']:.1f} | {1000 * row['all_reduce_s']:.2f} ({share:.1%}) | "
              f"{1000 * row['all_reduce_alone_s']:.2f} ({alone:.1%}) |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"overrides": DEFAULTS + overrides, "steps": args.steps, "warmup": args.warmup,
                               "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"\nwritten: {out.resolve()}")


if __name__ == "__main__":
    main()
