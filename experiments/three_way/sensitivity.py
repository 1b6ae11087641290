"""How far apart two float64 runs of the three-way cell drift when one starts from weights perturbed by a relative
``--eps`` (default 1e-7, float32's rounding): the same vmap driver, seed and task stream. If they split as early
and as far as the three float32 ways do, the float32 gaps are this cell's amplification of rounding, not a
difference between the implementations.

    python experiments/three_way/sensitivity.py [--iterations 6] [--eps 1e-7] [--preset NAME] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

import torch

from meta.training.builders import build_learner, build_optimizer, build_sampler
from meta.training.config import ConfigError, load_config

overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--preset", default="maml_omniglot_5w1s")
parser.add_argument("--iterations", type=int, default=6)
parser.add_argument("--eps", type=float, default=1e-7, help="relative perturbation of every initial weight")
parser.add_argument("--perturbation-seed", type=int, default=5, help="seed of the perturbation's normal draws")
args = parser.parse_args([a for a in sys.argv[1:] if a not in overrides])
try:
    cfg = load_config([f"preset={args.preset}", "inner.adapt_norm=true", "device=cpu", *overrides])
except ConfigError as error:
    sys.exit(f"config error: {error}")
device = torch.device("cpu")
sampler = build_sampler(cfg, "train", device)
runs = []
for eps in (0.0, args.eps):
    learner = build_learner(cfg, torch.float64, device)
    noise = torch.Generator().manual_seed(args.perturbation_seed)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=noise, dtype=p.dtype))
    runs.append((learner, build_optimizer(cfg, learner)))
stream = torch.Generator().manual_seed(cfg.seed)
print(f"{args.preset}, inner.adapt_norm=true, float64, vmap: as initialized vs perturbed by {args.eps:g} (relative)")
for step in range(args.iterations):
    batch = sampler.sample(cfg.train.meta_batch, stream)
    tasks = (batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y)
    a, b = (learner.train_step(opt, tasks, driver="vmap").loss.mean().item() for learner, opt in runs)
    print(f"iteration {step + 1}: loss {a:.10f} vs {b:.10f}, relative gap {abs(a - b) / abs(a):.1e}", flush=True)
