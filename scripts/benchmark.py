"""Benchmark suite: meta-step timings against learn2learn and the functorch example, per-sample gradients,
and peak memory by vmap chunk size. Writes results.json, results.md and meta_step.png under --out.

    python scripts/benchmark.py                      # the full paper grid on this machine, into runs/benchmark
                                                     # (2-core CPU: about 90 min)
    python scripts/benchmark.py --quick --out /tmp/b # a tiny grid (used by the tests)
    python scripts/benchmark.py --device cuda --out experiments/benchmarks/h100
    python scripts/benchmark.py --only miniimagenet  # MAML's mini-ImageNet meta-steps (3x84x84, 32 filters), not
                                                     # in the default grid
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is beside meta/, not installed with it

import meta  # noqa: E402
from benchmarks.measure import count_flops, interleaved_medians, matmul_peak_gflops
from benchmarks.memory_probe import probe
from benchmarks.meta_step import CANDIDATE_NAMES, Setting, Tasks, candidates, ours, paper_grid, random_tasks
from meta.training.metrics_log import to_json
from meta.training.run_folder import atomic_write_text
from meta.training.run_metadata import device_name, git_commit

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu")
parser.add_argument("--out", default="runs/benchmark", help="output folder (committed results use their own --out)")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--quick", action="store_true", help="a tiny grid and few repeats (smoke test)")
parser.add_argument("--only", default="", help="run only settings whose name contains one of these texts (a,b,...)")
parser.add_argument("--drivers", default="", help="comma-separated subset of the implementations (default: all)")
parser.add_argument("--no-tf32", action="store_true", help="CUDA: full float32 convolutions (PyTorch allows TF32)")
parser.add_argument("--no-l2l", action="store_true", help="skip learn2learn (if it is not installed)")
parser.add_argument("--skip-timing", action="store_true", help="skip the meta-step timing grid")
parser.add_argument("--skip-memory", action="store_true", help="skip the memory probes")
args = parser.parse_args()


@dataclass(frozen=True)
class ImageSetting(Setting):
    """A mini-ImageNet-shaped setting: ``channels`` x ``size`` x ``size`` images and MAML's mini-ImageNet Conv4
    (``filters`` filters, max-pool, flattened 5x5 head at 84 pixels) with its inner step 0.01 (cbfinn/maml main.py
    L17, configs/maml_miniimagenet_5w1s.yaml)."""

    size: int = 84
    channels: int = 3
    filters: int = 32

    @property
    def lr(self) -> float:
        return 0.01

    @property
    def name(self) -> str:
        return f"miniimagenet {super().name}"


def miniimagenet_grid(quick: bool) -> list[Setting]:
    """MAML's mini-ImageNet meta-steps: 5-way 1- and 5-shot, 15 queries, meta-batch 4, 5 inner steps, second and
    first order (a tiny one with ``quick``). Run with ``--only miniimagenet``; never part of the default grid."""
    if quick:
        return [ImageSetting(5, 1, 1, 2, 1, False)]
    return [ImageSetting(5, shots, 15, 4, 5, first_order) for shots in (1, 5) for first_order in (False, True)]


def setting_model(s: Setting) -> nn.Module:
    """The benchmarked network: MAML's Omniglot Conv4, or the mini-ImageNet Conv4 for an :class:`ImageSetting`."""
    g = torch.Generator().manual_seed(0)
    if isinstance(s, ImageSetting):
        return meta.build_model("conv4_maxpool", ways=s.ways, in_channels=s.channels, image_size=s.size,
                                filters=s.filters, generator=g)
    return meta.build_model("conv4", ways=s.ways, generator=g)


def setting_tasks(s: Setting, device: torch.device, generator: torch.Generator) -> Tasks:
    """Random tasks of the setting's shape (1 x 28 x 28, or the :class:`ImageSetting`'s)."""
    if not isinstance(s, ImageSetting):
        return random_tasks(s, device, generator)
    sy = torch.arange(s.ways).repeat_interleave(s.shots).expand(s.tasks, -1).contiguous()
    qy = torch.arange(s.ways).repeat_interleave(s.queries).expand(s.tasks, -1).contiguous()
    sx = torch.rand(s.tasks, s.ways * s.shots, s.channels, s.size, s.size, generator=generator)
    qx = torch.rand(s.tasks, s.ways * s.queries, s.channels, s.size, s.size, generator=generator)
    return sx.to(device), sy.to(device), qx.to(device), qy.to(device)


drivers = [d for d in args.drivers.split(",") if d]
if unknown := sorted(set(drivers) - set(CANDIDATE_NAMES)):
    parser.error(f"--drivers: unknown {unknown}; choose from {', '.join(CANDIDATE_NAMES)}")
if drivers and "auto" not in drivers:
    parser.error("--drivers must include auto: every row reports the others against it")
grid = [Setting(5, 1, 1, 4, 1, False), Setting(5, 1, 2, 4, 2, True)] if args.quick else paper_grid()
if "miniimagenet" in args.only:  # asked for by name only: the default grid stays the Omniglot one
    grid += miniimagenet_grid(args.quick)
grid = [] if args.skip_timing else [s for s in grid if any(text in s.name for text in args.only.split(","))]
if args.only and not args.skip_timing and not grid:
    parser.error(f"--only {args.only!r} matches no setting; names look like {paper_grid()[0].name!r}")
device = torch.device(args.device)
if device.type == "cuda" and not torch.cuda.is_available():
    sys.exit("--device cuda was asked for, but no CUDA device is available")
if args.no_tf32:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
generator = torch.Generator().manual_seed(0)
model = meta.build_model("conv4", ways=5, generator=generator)

# ---- the machine's yardstick ----------------------------------------------------------------
peak = matmul_peak_gflops(device, size=512 if args.quick else 2048)
print(f"{device_name(device)} | float32 matmul: {peak:.0f} GFLOP/s")

# ---- outputs, rewritten after every setting so that a partial run leaves usable files -------------
meta_info = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
             "git_commit": git_commit(), "matmul_gflops": peak, "repeats": args.repeats, "quick": args.quick,
             "cudnn_tf32": torch.backends.cudnn.allow_tf32}


def write_outputs(rows: list[dict], per_sample_rows: dict, memory: dict, complete: bool) -> None:
    """results.json, results.md and meta_step.png under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {"machine": meta_info, "complete": complete, "meta_step": rows, "per_sample": per_sample_rows,
               "memory": memory}
    atomic_write_text(out / "results.json", to_json(results, indent=2))  # strict JSON: a failed timing is null

    tf32_note = f", cuDNN TF32 {'on' if meta_info['cudnn_tf32'] else 'off'}" if device.type == "cuda" else ""
    names = list(dict.fromkeys(n for r in rows for n in r["drivers"]))  # a driver may be missing in some rows
    lines = [f"# Meta-step benchmark: {meta_info['device']}", "",
             f"torch {meta_info['torch']}, commit {meta_info['git_commit'][:12]}, measured float32 matmul peak "
             f"{peak:.0f} GFLOP/s{tf32_note}. Median ms per full meta-step (inner loop + meta-gradient + Adam) over "
             f"{args.repeats} interleaved repeats after one warm-up round, same weights and data for every "
             "implementation. `auto` times exclude its one-time choice, made during the warm-up round. "
             "`l2l/x` is learn2learn's time divided by x's (above 1: x is faster)."
             + ("" if complete else f" PARTIAL RUN: {len(rows)} of {len(grid)} settings."), "",
             "| setting | GFLOP | " + " | ".join(f"{n} ms" for n in names)
             + " | l2l/auto | l2l/vmap | l2l/best of ours | auto % of peak | auto chose |",
             "|---|---|" + "---|" * (len(names) + 5)]
    for r in rows:
        d = r["drivers"]
        nan = float("nan")
        l2l = d.get("learn2learn", {}).get("ms", nan)
        vmap_ms = d.get("vmap", {}).get("ms", nan)
        best = min(v["ms"] for k, v in d.items() if k not in ("learn2learn", "functorch"))
        digits = 0 if device.type == "cpu" else 1
        lines.append(f"| {r['setting']} | {r['gflop']:.2f} | "
                     + " | ".join(f"{d[n]['ms']:.{digits}f}" if n in d else "-" for n in names)
                     + f" | {l2l / d['auto']['ms']:.2f} | {l2l / vmap_ms:.2f} | {l2l / best:.2f} | "
                     f"{100 * d['auto']['fraction_of_peak']:.0f}% | {r['auto_choice']} |")
    lines += ["", f"## Per-sample gradients (tutorial SimpleCNN, batch {batch}, MNIST-shaped)", "",
              "| method | ms |", "|---|---|"] + [f"| {k} | {v['ms']:.1f} |" for k, v in per_sample_rows.items()]
    lines += ["", f"## Peak memory of one meta-step ({memory['setting']})", "",
              ("CUDA allocator peak during one meta-step minus the allocation before it (after a warm-up step)."
               if device.type == "cuda" else
               "Each row from a fresh process (`benchmarks/memory_probe.py`): peak resident set during one "
               "meta-step minus the resident set before it."), "",
              "| driver | chunk size | peak MB | ms |", "|---|---|---|---|"]
    lines += [f"| {m['driver']} | {m['chunk_size'] or '-'} | {m['peak_mb']:.0f} | {m['ms']:.0f} |"
              for m in memory["rows"]]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.6), 5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))],
               [r["drivers"].get(name, {}).get("ms", float("nan")) for r in rows], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["setting"] for r in rows], rotation=70,
                  ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per meta-step (log)")
    ax.set_title(meta_info["device"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "meta_step.png", dpi=110)
    print(f"wrote {out}/results.json, results.md, meta_step.png")


# ---- per-sample gradients (the PyTorch tutorial's setup) ---------------------------------------


class SimpleCNN(nn.Module):
    """The per-sample-gradients tutorial's network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return F.log_softmax(self.fc2(F.relu(self.fc1(torch.flatten(x, 1)))), dim=1)


cnn = SimpleCNN().to(device)
batch = 16 if args.quick else 64
x = torch.randn(batch, 1, 28, 28, generator=generator).to(device)
y = torch.randint(0, 10, (batch,), generator=generator).to(device)
per_sample = {
    "for-loop": lambda: meta.per_sample_grads_loop(cnn, x, y, loss_fn=F.nll_loss),
    "vmap(grad)": lambda: meta.per_sample_grads(cnn, x, y, loss_fn=F.nll_loss),
}
try:
    from opacus import GradSampleModule

    opacus_model = GradSampleModule(SimpleCNN().to(device))
    opacus_model.load_state_dict({f"_module.{k}": v for k, v in cnn.state_dict().items()})

    def opacus_step() -> None:
        opacus_model.zero_grad(set_to_none=True)
        F.nll_loss(opacus_model(x), y).backward()

    per_sample["opacus"] = opacus_step
except ImportError:
    print("opacus is not installed: skipping its per-sample gradients")
ps = interleaved_medians(per_sample, repeats=3 if args.quick else 10, device=device)
per_sample_rows = {k: {"ms": v["median_s"] * 1e3} for k, v in ps.items()}
print("per-sample gradients, batch", batch, {k: f"{v['ms']:.1f}ms" for k, v in per_sample_rows.items()})

# ---- memory: vmap chunk size bounds the peak (each number from a fresh process, see memory_probe) ------
mem_setting = Setting(5, 1, 1, 4, 2, False) if args.quick else Setting(20, 5, 5, 16, 5, False)
memory_rows = []
if not args.skip_memory:
    probe_args = dict(ways=mem_setting.ways, shots=mem_setting.shots, queries=mem_setting.queries,
                      tasks=mem_setting.tasks, steps=mem_setting.steps, first_order=mem_setting.first_order,
                      device=args.device)
    for chunk in (None, 8, 4, 2, 1):
        memory_rows.append({"driver": "vmap", "chunk_size": chunk or mem_setting.tasks,
                            **probe(driver="vmap", chunk_size=chunk, **probe_args)})
        print(f"memory {mem_setting.name} vmap chunk {chunk}: {memory_rows[-1]['peak_mb']:.0f} MB", flush=True)
    for driver in ("loop", "loop_autograd", "vmap_autograd", "functorch", "learn2learn"):
        if driver == "learn2learn" and args.no_l2l:
            continue
        memory_rows.append({"driver": driver, "chunk_size": None, **probe(driver=driver, **probe_args)})
        print(f"memory {mem_setting.name} {driver}: {memory_rows[-1]['peak_mb']:.0f} MB", flush=True)
memory = {"setting": mem_setting.name, "rows": memory_rows}

# ---- meta-steps -----------------------------------------------------------------------------
# cheapest first, so that a cut-short run has the most rows
grid = sorted(grid, key=lambda s: s.tasks * s.ways * (s.shots * s.steps + s.queries) * (2 - s.first_order))
rows = []
for s in grid:
    net = setting_model(s).to(device)
    tasks = setting_tasks(s, device, generator)
    flops = count_flops(ours(net, s, tasks, "loop"))
    fns = candidates(net, s, tasks, with_l2l=not args.no_l2l)
    fns = {k: f for k, f in fns.items() if k in drivers} if drivers else fns
    timings = interleaved_medians(fns, repeats=2 if args.quick else args.repeats, device=device)
    row = {"setting": s.name, **vars(s), "gflop": flops / 1e9, "drivers": {},
           "auto_choice": ", ".join(fns["auto"].learner.auto_driver.choices.values())}
    for name in fns:
        ms = timings[name]["median_s"] * 1e3
        row["drivers"][name] = {
            "ms": ms, "steps_per_s": 1e3 / ms, "gflops": flops / 1e9 / (ms / 1e3),
            "fraction_of_peak": flops / 1e9 / (ms / 1e3) / peak,
            "times_ms": [t * 1e3 for t in timings[name]["times_s"]],
        }
    rows.append(row)
    summary = "  ".join(f"{k} {v['ms']:.0f}ms" for k, v in row["drivers"].items())
    print(f"{s.name:32s} {flops / 1e9:6.2f} GFLOP  {summary}  (auto: {row['auto_choice']})", flush=True)
    write_outputs(rows, per_sample_rows, memory, complete=False)

write_outputs(rows, per_sample_rows, memory, complete=True)
print(f"wrote {out}/results.json, results.md, meta_step.png")
