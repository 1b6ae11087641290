"""Three-way experiment: one MAML cell trained from the same seed and the same task stream by our ``vmap`` driver,
our ``loop`` driver and learn2learn's ``MAML`` (meta.baselines.learn2learn_maml), recording every iteration's
query loss, accuracy and wall time, then plotting the three learning curves on one figure.

    python experiments/three_way/run.py                                  # 50 iterations: a check that it works
    python experiments/three_way/run.py --iterations 7580 --test-tasks 600 --out experiments/three_way/cpu_7580
    python experiments/three_way/run.py --iterations 60000 --test-tasks 600 device=cuda --out ...

The cell is ``--preset`` (default maml_omniglot_5w1s) with ``inner.adapt_norm=true``: learn2learn's MAML adapts
every parameter, so the batch-norm shifts are adapted in the inner loop (cbfinn/maml's code does not adapt them);
every other knob is the preset's. Any ``key=value`` goes to the config (e.g. ``device=cuda``, ``dtype=float64``).
The three learners start from the same weights (drawn from ``seed``) and each iteration's batch is drawn once from
the training generator seeded with ``seed`` (the stream of ``scripts/train_maml.py``) and given to all three; the
order in which they step rotates every iteration, so drift of a shared CPU's speed spreads over them evenly.
Outputs in ``--out``: ``results.json`` (config, per-iteration curves, wall times, the largest differences between
the ways' curves and final weights, and with ``--test-tasks`` each way's test accuracy) and ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from meta.baselines import check_learn2learn_expressible, learn2learn_meta_gradient
from meta.evaluation import evaluate_learner
from meta.training.builders import (
    build_inner_rule,
    build_learner,
    build_optimizer,
    build_sampler,
    resolve_device,
    resolve_dtype,
    test_inner_steps,
)
from meta.training.config import ConfigError, load_config
from meta.training.run_folder import atomic_write_text

WAYS = ("vmap", "loop", "learn2learn")

overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--preset", default="maml_omniglot_5w1s", help="the cell (default maml_omniglot_5w1s)")
parser.add_argument("--iterations", type=int, default=50, help="training iterations of each way (default 50)")
parser.add_argument("--ways", default=",".join(WAYS), help=f"comma list out of {', '.join(WAYS)} (default all)")
parser.add_argument("--test-tasks", type=int, default=0, help="test tasks per way at the end (default 0: none)")
parser.add_argument("--log-every", type=int, default=10, help="print a line every this many iterations")
parser.add_argument("--out", default="runs/three_way", help="output folder (default runs/three_way)")
args = parser.parse_args([a for a in sys.argv[1:] if a not in overrides])
ways = [w.strip() for w in args.ways.split(",") if w.strip()]
if not ways or set(ways) - set(WAYS) or len(set(ways)) != len(ways):
    sys.exit(f"argument error: --ways {args.ways!r}: distinct names out of {', '.join(WAYS)}")
if args.iterations <= 0 or args.test_tasks < 0 or args.log_every <= 0:
    sys.exit("argument error: --iterations and --log-every must be positive, --test-tasks at least 0")
try:
    cfg = load_config([f"preset={args.preset}", "inner.adapt_norm=true", *overrides,
                       f"train.iterations={args.iterations}"])
    if cfg.algorithm != "maml":
        raise ConfigError(f"algorithm={cfg.algorithm}: the three ways are MAML drivers; choose a maml preset")
    if cfg.train.lr_schedule != "constant":
        raise ConfigError(f"train.lr_schedule={cfg.train.lr_schedule}: the three ways take Adam steps at the constant "
                          f"train.meta_lr; leave the schedule constant")
    if "learn2learn" in ways:
        check_learn2learn_expressible(cfg)
except (ConfigError, ValueError) as error:
    sys.exit(f"config error: {error}")

device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
sampler = build_sampler(cfg, "train", device)
learners = {way: build_learner(cfg, dtype, device) for way in ways}  # the same weights: drawn from cfg.seed
optimizers = {way: build_optimizer(cfg, learner) for way, learner in learners.items()}
generator = torch.Generator().manual_seed(cfg.seed)  # the training stream of scripts/train_maml.py
curves = {way: {"loss": [], "accuracy": [], "seconds": []} for way in ways}
print(f"three-way: {args.preset} with inner.adapt_norm=true, {args.iterations} iterations, ways {', '.join(ways)}, "
      f"device {device}, {cfg.dtype}; writing to {out.resolve()}")


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_once(way: str, step: int, tasks: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """One outer step of one way; returns its mean query loss and accuracy (percent)."""
    learner, optimizer = learners[way], optimizers[way]
    learner.set_iteration(step, cfg.train.iterations)  # the meta-lr is constant: checked at start
    if way == "learn2learn":
        result = learn2learn_meta_gradient(learner.model, tasks, cfg.inner.lr, cfg.inner.steps,
                                           first_order=cfg.inner.first_order, loss_reduction=cfg.inner.loss_reduction)
        for name, p in learner.model.named_parameters():
            p.grad = result.grads[name]
        optimizer.step()
    else:
        result = learner.train_step(optimizer, tasks, driver=way, chunk_size=cfg.train.chunk_size)
    return result.loss.mean().item(), result.accuracy.mean().item() * 100


if "learn2learn" in ways:
    import learn2learn  # noqa: F401  (imported here, not inside the first timed step)
start = time.perf_counter()
for step in range(args.iterations):
    batch = sampler.sample(cfg.train.meta_batch, generator)
    tasks = (batch.support_x.to(dtype), batch.support_y, batch.query_x.to(dtype), batch.query_y)
    shift = step % len(ways)
    for way in ways[shift:] + ways[:shift]:
        sync()
        tick = time.perf_counter()
        loss, accuracy = step_once(way, step, tasks)  # .item() synchronizes
        curves[way]["seconds"].append(time.perf_counter() - tick)
        curves[way]["loss"].append(loss)
        curves[way]["accuracy"].append(accuracy)
    if (step + 1) % args.log_every == 0 or step + 1 == args.iterations:
        print(f"step {step + 1}: " + "; ".join(
            f"{w} loss {curves[w]['loss'][-1]:.4f} acc {curves[w]['accuracy'][-1]:.1f}% "
            f"{sum(curves[w]['seconds']):.1f}s" for w in ways), flush=True)


def max_gap(key: str, a: str, b: str) -> float:
    return max(abs(x - y) for x, y in zip(curves[a][key], curves[b][key]))


def first_split(a: str, b: str, relative: float = 1e-4) -> int | None:
    """The first iteration (1-based) whose losses differ by more than ``relative`` (relative), or None."""
    pairs = zip(curves[a]["loss"], curves[b]["loss"])
    return next((i + 1 for i, (x, y) in enumerate(pairs) if abs(x - y) > relative * max(abs(x), abs(y))), None)


def weight_gaps(a: str, b: str) -> dict[str, float]:
    """The largest absolute difference between two ways' final weights, per parameter tensor. Parameters the output
    does not depend on (a conv bias right before batch norm) get gradients that are roundoff, which Adam's
    g / (sqrt(v) + eps) turns into steps of about the learning rate: there the ways can drift apart harmlessly."""
    pa, pb = dict(learners[a].model.named_parameters()), dict(learners[b].model.named_parameters())
    return {k: (pa[k] - pb[k]).abs().max().item() for k in pa}


pairs = [(a, b) for i, a in enumerate(ways) for b in ways[i + 1:]]
summary = {
    way: {"train_seconds": sum(c["seconds"]), "median_step_ms": sorted(c["seconds"])[len(c["seconds"]) // 2] * 1e3,
          "final_loss": c["loss"][-1], "final_accuracy": c["accuracy"][-1]} for way, c in curves.items()}
gaps = {f"{a} vs {b}": {"max_loss_gap": max_gap("loss", a, b), "max_accuracy_gap": max_gap("accuracy", a, b),
                        "first_loss_split_1e-4": first_split(a, b), "weight_gaps": weight_gaps(a, b)}
        for a, b in pairs}
if args.test_tasks:
    test = build_sampler(cfg, "test", device)
    rule = build_inner_rule(cfg, test=True)
    for way, learner in learners.items():
        summary[way]["test"] = evaluate_learner(
            learner.to(device), test, num_tasks=args.test_tasks, seed=cfg.eval.seed, batch_size=cfg.eval.batch_size,
            inner_steps=test_inner_steps(cfg), rule=rule, dtype=dtype, device=device)
results = {"command": " ".join(["python experiments/three_way/run.py", *sys.argv[1:]]), "preset": args.preset,
           "iterations": args.iterations, "ways": ways, "device": str(device), "torch": torch.__version__,
           "wall_seconds": time.perf_counter() - start, "summary": summary, "gaps": gaps, "curves": curves,
           "config": OmegaConf.to_container(cfg, resolve=True)}
atomic_write_text(out / "results.json", json.dumps(results, indent=1))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
styles = {"vmap": ("-", 3.0), "loop": ("--", 2.0), "learn2learn": (":", 1.5)}  # coinciding curves stay visible
steps = list(range(1, args.iterations + 1))
for way in ways:
    style, width = styles[way]
    label = f"{way} ({summary[way]['train_seconds']:.0f} s, {summary[way]['median_step_ms']:.0f} ms/it)"
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(steps, curves[way][key], style, linewidth=width, label=label)
axes[0].set_ylabel("training query loss (mean over the meta-batch)")
axes[1].set_ylabel("training query accuracy (%)")
for ax in axes:
    ax.set_xlabel("iteration")
    ax.legend(fontsize=8)
fig.suptitle(f"{args.preset}, inner.adapt_norm=true: same seed and task stream, three implementations "
             f"({device}, {cfg.dtype})", fontsize=9)
fig.tight_layout()
fig.savefig(out / "curves.png", dpi=100)
plt.close(fig)
for way in ways:
    s = summary[way]
    test = f", test {s['test']['accuracy']:.2f} ± {s['test']['ci95']:.2f}%" if "test" in s else ""
    print(f"{way}: {s['train_seconds']:.1f} s of training, median {s['median_step_ms']:.1f} ms/iteration{test}")
for pair, gap in gaps.items():
    worst = sorted(gap["weight_gaps"].items(), key=lambda kv: -kv[1])[:2]
    split = gap["first_loss_split_1e-4"]
    print(f"{pair}: largest gap in loss {gap['max_loss_gap']:.2e}, accuracy {gap['max_accuracy_gap']:.2e} points "
          f"(losses {'never differ' if split is None else 'first differ'} by more than 1e-4 relative"
          f"{'' if split is None else f' at iteration {split}'}); final weights: "
          + ", ".join(f"{name} {value:.2e}" for name, value in worst))
print(f"results: {(out / 'results.json').resolve()}  figure: {(out / 'curves.png').resolve()}")
