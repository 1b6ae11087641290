"""Reproduce a paper table: train every cell and seed of a table spec, then write the table next to the paper's.

    python scripts/reproduce.py maml_omniglot                          # experiments/tables/maml_omniglot.yaml, 1 seed
    python scripts/reproduce.py maml_omniglot --seeds 3 --minutes 30   # about 30 minutes of training per run
    python scripts/reproduce.py fomaml_omniglot --only 5w1s --iterations 6000 device=cuda
    python scripts/reproduce.py maml_omniglot --nproc 4 device=cuda      # each run on 4 GPUs through torchrun

Every run goes through scripts/train_maml.py (the same training code) into <out>/<cell>/seed<k>. Resumable: a run
with results.json is skipped, a run folder without it is continued with resume=true, a missing one is started.
--minutes M times a short probe run per cell and picks the iterations that train for about M minutes (validation
and test not counted); the number is kept in <out>/plan.json, printed, and written into the table.
A two-stage cell (retrain: in its spec, ProtoNets' run_trainval.py) trains stage 1 with early stopping into
<out>/<cell>/seed<k>_stage1, then retrains from scratch with its retrain keys for the iterations stage 1's best
validation gives into <out>/<cell>/seed<k>, the run that is tested and tabulated; each stage is skipped when done.
Outputs in <out> (default runs/tables/<table>): table.md, table.json, table.png.
--collect FOLDER... trains nothing: it tabulates the finished runs that earlier runner calls left in those output
folders (their <cell>/seed<k>/). --readme FILE also writes the table rows into FILE between the lines
<!-- reproduce.py TABLE --> and <!-- end reproduce.py TABLE --> (the README's Results section is written so).
Any key=value is passed to every run (e.g. device=cuda, data.root=...); it shows in the protocol column when it
changes what the run measures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from meta.package_files import checkout_root, shipped_path
from meta.training.config import load_config
from meta.training.run_log import atomic_write_text
from meta.training.tables import (
    PROBE_ITERATIONS,
    PROBE_LOG_EVERY,
    TableError,
    aggregate_cell,
    check_cells,
    iterations_for_minutes,
    load_table,
    markdown_table,
    plot_table,
    readme_block,
    replace_block,
    retrain_args,
    run_action,
    select_cells,
    stage1_dir,
    train_command,
)

REPO = checkout_root()  # None for an installed wheel: it ships the table specs and this script's neighbours
TRAIN = Path(__file__).resolve().with_name("train_maml.py")

# ---- arguments --------------------------------------------------------------------------------
overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]  # key=value for every run
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("table", help="a table spec: a name in experiments/tables/ or a path to a .yaml file")
parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per cell (default 1)")
schedule = parser.add_mutually_exclusive_group()
schedule.add_argument("--iterations", type=int, help="training iterations of every run (default: the preset's)")
schedule.add_argument("--minutes", type=float, help="choose each cell's iterations for about M minutes of training")
parser.add_argument("--only", nargs="+", metavar="CELL", help="run and tabulate only these cells")
parser.add_argument("--out", help="output folder (default runs/tables/<table>)")
parser.add_argument("--nproc", type=int, default=1,
                    help="processes per run (default 1): N > 1 launches each run through torchrun on N processes "
                         "of this machine (GPUs or CPU cores; the README's Scaling out)")
parser.add_argument("--collect", nargs="+", metavar="FOLDER",
                    help="train nothing: tabulate the finished runs in these output folders of earlier runner calls")
parser.add_argument("--readme", metavar="FILE",
                    help="also write the table rows into FILE between <!-- reproduce.py TABLE --> and "
                         "<!-- end reproduce.py TABLE -->")
args = parser.parse_args([a for a in sys.argv[1:] if a not in overrides])
if args.seeds < 1 or args.nproc < 1 or any(v is not None and v <= 0 for v in (args.iterations, args.minutes)):
    sys.exit("argument error: --seeds, --nproc, --iterations and --minutes must be positive")
tables = shipped_path("experiments/tables")
table_path = Path(args.table) if args.table.endswith(".yaml") else tables / f"{args.table}.yaml"
try:
    spec = load_table(table_path)
    cells = select_cells(spec, args.only)
    check_cells(spec, cells, overrides)  # presets exist and pin the table's knobs; overrides are valid keys
except TableError as error:
    sys.exit(f"table error: {error}")


def write_readme(rows: list[dict]) -> None:
    """--readme: the table rows into the file's marked block, under the command (less --readme itself)."""
    if args.readme is None:
        return
    argv = sys.argv[1:]
    if "--readme" in argv:  # the --readme FILE pair (as two arguments or --readme=FILE) is not part of the table
        del argv[argv.index("--readme"):argv.index("--readme") + 2]
    argv = [a for a in argv if not a.startswith("--readme=")]
    path = Path(args.readme)
    try:
        text = replace_block(path.read_text(), spec.name,
                             readme_block(spec, rows, " ".join(["python scripts/reproduce.py", *argv])))
    except (OSError, TableError) as error:
        sys.exit(f"--readme {path}: {error}")
    atomic_write_text(path, text)
    print(f"table {spec.name} written into {path.resolve()}")


if args.collect:  # ---- no training: the finished runs of earlier calls ----------------------------
    if overrides or args.iterations or args.minutes or args.seeds != 1 or args.nproc != 1 or args.out:
        sys.exit("argument error: --collect trains nothing and writes no output folder: drop key=value, --seeds, "
                 "--iterations, --minutes, --nproc and --out")
    folders = [Path(f) for f in args.collect]
    for folder in folders:
        if not folder.is_dir():
            sys.exit(f"argument error: --collect {folder}: no such folder")
    rows = [aggregate_cell(cell, [d for f in folders for d in sorted((f / cell.name).glob("seed*")) if d.is_dir()])
            for cell in cells]
    print(markdown_table(spec, rows, " ".join(["python scripts/reproduce.py", *sys.argv[1:]])))
    write_readme(rows)
    sys.exit(0)
out = Path(args.out or f"runs/tables/{spec.name}").resolve()
out.mkdir(parents=True, exist_ok=True)
env = dict(os.environ)
if REPO is not None:  # the runs import this checkout's meta
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
command = " ".join(["python scripts/reproduce.py", *sys.argv[1:]])
print(f"table {spec.name}: {spec.title} | {len(cells)} cells x {args.seeds} seeds | writing to {out.resolve()}")


def train(cell_args: list[str], run_dir: Path) -> None:
    """One run of train_maml.py into run_dir: skipped if finished, resumed if its folder exists, else started."""
    action = run_action(run_dir)
    print(f"[{action}] {run_dir}", flush=True)
    if action == "skip":
        return
    resume = ["resume=true"] if action == "resume" else []
    proc = subprocess.run([*train_command(TRAIN, args.nproc), *cell_args, f"out_dir={run_dir}", *resume], env=env,
                          cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"run {run_dir} failed (exit {proc.returncode}); fix it and rerun the same command: finished "
                 f"runs are skipped, this one continues")


# ---- iterations per cell: the preset's, --iterations, or a timed probe for --minutes ------------
plan_path = out / "plan.json"
plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
iterations: dict[str, int | None] = {}
for cell in cells:
    base = [f"preset={cell.preset}", *cell.overrides, *overrides]
    if args.minutes is None:
        iterations[cell.name] = args.iterations
        continue
    if plan.get(cell.name, {}).get("minutes") == args.minutes:  # probed before: the same number again
        iterations[cell.name] = plan[cell.name]["iterations"]
        continue
    probe_dir = out / "probes" / cell.name
    train([*base, "seed=0", f"train.iterations={PROBE_ITERATIONS}", f"train.log_every={PROBE_LOG_EVERY}",
           f"train.val_every={PROBE_ITERATIONS}", f"train.checkpoint_every={PROBE_ITERATIONS}", "train.val_tasks=10",
           "eval.tasks=10", "eval.batch_size=10", "progress=false"], probe_dir)
    records = [json.loads(line) for line in (probe_dir / "metrics.jsonl").read_text().splitlines()]
    cap = load_config(base).train.iterations
    count, rate = iterations_for_minutes(records, args.minutes, cap)
    iterations[cell.name] = count
    plan[cell.name] = {"minutes": args.minutes, "iterations": count, "probe_its_per_s": rate,
                       "preset_iterations": cap}
    atomic_write_text(plan_path, json.dumps(plan, indent=2))
    print(f"cell {cell.name}: {rate:.2f} it/s in the probe -> {count} iterations for {args.minutes:g} minutes "
          f"(repeat with --only {cell.name} --iterations {count})")

# ---- training: every cell and seed (a two-stage cell: stage 1 with early stopping, then its retraining) ---------
for cell in cells:
    schedule_args = [] if iterations[cell.name] is None else [f"train.iterations={iterations[cell.name]}"]
    for seed in range(args.seeds):
        run_dir, base = out / cell.name / f"seed{seed}", [f"preset={cell.preset}", *cell.overrides, *overrides]
        if not cell.retrain:
            train([*base, *schedule_args, f"seed={seed}"], run_dir)
            continue
        first = stage1_dir(run_dir)  # stage 1: the preset with early stopping on the validation loss
        train([*base, *schedule_args, f"seed={seed}"], first)
        try:
            stage2 = retrain_args(cell, first)
        except ValueError as error:
            sys.exit(f"table error: cell {cell.name}: {error}")
        print(f"cell {cell.name} seed {seed}: stage 2 retrains with {' '.join(stage2)}", flush=True)
        train([*base, *stage2, f"seed={seed}"], run_dir)  # stage 2, tested: from scratch on the retraining's data

# ---- the table ------------------------------------------------------------------------------------
rows = [aggregate_cell(cell, [out / cell.name / f"seed{seed}" for seed in range(args.seeds)]) for cell in cells]
markdown = markdown_table(spec, rows, command)
atomic_write_text(out / "table.md", markdown)
atomic_write_text(out / "table.json", json.dumps(
    {"table": spec.name, "title": spec.title, "source": spec.source, "command": command, "seeds": args.seeds,
     "plan": {c.name: plan.get(c.name) for c in cells if c.name in plan}, "rows": rows}, indent=2))
plot_table(spec, rows, out / "table.png")
print(markdown)
write_readme(rows)
print(f"table: {(out / 'table.md').resolve()}  json: {(out / 'table.json').resolve()}  "
      f"figure: {(out / 'table.png').resolve()}")
