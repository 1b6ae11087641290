"""The table runner behind ``meta-reproduce`` (``scripts/reproduce.py``): train every cell and seed of a table spec
(each run a process of ``scripts/train_maml.py``, through torchrun with ``--nproc``), then write the table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from meta.experiments.tables import (
    PROBE_ITERATIONS,
    PROBE_LOG_EVERY,
    Cell,
    TableError,
    TableSpec,
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
from meta.package_files import checkout_root, shipped_path
from meta.training.config import load_config
from meta.training.errors import RunError
from meta.training.run_folder import atomic_write_text

REPRODUCE_USAGE = """Reproduce a paper table: train every cell and seed of a table spec, then write the table next to
the paper's.

    {prog} maml_omniglot                          # experiments/tables/maml_omniglot.yaml, 1 seed
    {prog} maml_omniglot --seeds 3 --minutes 30   # about 30 minutes of training per run
    {prog} fomaml_omniglot --only 5w1s --iterations 6000 device=cuda
    {prog} maml_omniglot --nproc 4 device=cuda      # each run on 4 GPUs through torchrun

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
<!-- reproduce.py TABLE --> and <!-- end reproduce.py TABLE --> (the README's and docs/reproducing.md's results
are written so).
Any key=value is passed to every run (e.g. device=cuda, data.root=...); it shows in the protocol column when it
changes what the run measures.
"""


def write_readme(path: Path, spec: TableSpec, rows: list[dict[str, Any]], argv: list[str], prog: str) -> None:
    """``--readme FILE``: the table rows into the file's marked block, under the command (less --readme itself)."""
    argv = list(argv)
    if "--readme" in argv:  # the --readme FILE pair (as two arguments or --readme=FILE) is not part of the table
        del argv[argv.index("--readme"):argv.index("--readme") + 2]
    argv = [a for a in argv if not a.startswith("--readme=")]
    try:
        text = replace_block(path.read_text(), spec.name, readme_block(spec, rows, " ".join([prog, *argv])))
    except (OSError, TableError) as error:
        raise RunError(f"--readme {path}: {error}") from None
    atomic_write_text(path, text)
    print(f"table {spec.name} written into {path.resolve()}")


def train_process(cell_args: list[str], run_dir: Path, nproc: int) -> None:
    """One run of scripts/train_maml.py into ``run_dir`` in its own process (through torchrun with ``nproc`` > 1):
    skipped if finished, resumed if its folder exists, else started."""
    action = run_action(run_dir)
    print(f"[{action}] {run_dir}", flush=True)
    if action == "skip":
        return
    repo = checkout_root()  # None for an installed wheel: it ships the scripts
    env = dict(os.environ)
    if repo is not None:  # the runs import this checkout's meta
        env["PYTHONPATH"] = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    resume = ["resume=true"] if action == "resume" else []
    script = shipped_path("scripts") / "train_maml.py"
    with subprocess.Popen([*train_command(script, nproc), *cell_args, f"out_dir={run_dir}", *resume], env=env,
                          cwd=repo) as proc:
        try:
            proc.wait()
        except KeyboardInterrupt:  # Ctrl-C (or timeout -s INT) reached the run as well: it saves, then exits
            proc.wait()
            raise RunError(f"interrupted: {run_dir} stopped (exit {proc.returncode}) after saving its checkpoint; "
                           f"rerun the same command to continue it") from None
    if proc.returncode != 0:
        raise RunError(f"run {run_dir} failed (exit {proc.returncode}); fix it and rerun the same command: finished "
                       f"runs are skipped, this one continues")


def plan_iterations(cells: list[Cell], overrides: list[str], out: Path, iterations: int | None,
                    minutes: float | None, nproc: int) -> tuple[dict[str, int | None], dict[str, Any]]:
    """Training iterations per cell: the preset's, ``--iterations``, or a timed probe for ``--minutes`` (kept in
    ``<out>/plan.json``, so a rerun probes nothing). Returns the iterations and the plan."""
    plan_path = out / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    chosen: dict[str, int | None] = {}
    for cell in cells:
        base = [f"preset={cell.preset}", *cell.overrides, *overrides]
        if minutes is None:
            chosen[cell.name] = iterations
            continue
        if plan.get(cell.name, {}).get("minutes") == minutes:  # probed before: the same number again
            chosen[cell.name] = plan[cell.name]["iterations"]
            continue
        probe_dir = out / "probes" / cell.name
        train_process([*base, "seed=0", f"train.iterations={PROBE_ITERATIONS}", f"train.log_every={PROBE_LOG_EVERY}",
                       f"train.val_every={PROBE_ITERATIONS}", f"train.checkpoint_every={PROBE_ITERATIONS}",
                       "train.val_tasks=10", "eval.tasks=10", "eval.batch_size=10", "progress=false"], probe_dir, nproc)
        records = [json.loads(line) for line in (probe_dir / "metrics.jsonl").read_text().splitlines()]
        cap = load_config(base).train.iterations
        count, rate = iterations_for_minutes(records, minutes, cap)
        chosen[cell.name] = count
        plan[cell.name] = {"minutes": minutes, "iterations": count, "probe_its_per_s": rate,
                           "preset_iterations": cap}
        atomic_write_text(plan_path, json.dumps(plan, indent=2))
        print(f"cell {cell.name}: {rate:.2f} it/s in the probe -> {count} iterations for {minutes:g} minutes "
              f"(repeat with --only {cell.name} --iterations {count})")
    return chosen, plan


def reproduce_table(args: argparse.Namespace, overrides: list[str], argv: list[str], prog: str) -> list[dict]:
    """Run the table the parsed command line names (``meta-reproduce``'s arguments ``args``, its ``key=value``
    ``overrides`` and its whole ``argv``, for the command recorded in the table). Returns the table rows; raises
    :class:`RunError` with a one-line message."""
    if args.seeds < 1 or args.nproc < 1 or any(v is not None and v <= 0 for v in (args.iterations, args.minutes)):
        raise RunError("argument error: --seeds, --nproc, --iterations and --minutes must be positive")
    tables = shipped_path("experiments/tables")
    table_path = Path(args.table) if args.table.endswith(".yaml") else tables / f"{args.table}.yaml"
    try:
        spec = load_table(table_path)
        cells = select_cells(spec, args.only)
        check_cells(spec, cells, overrides)  # presets exist and pin the table's knobs; overrides are valid keys
    except TableError as error:
        raise RunError(f"table error: {error}") from None
    command = " ".join([prog, *argv])
    readme = None if args.readme is None else Path(args.readme)

    if args.collect:  # ---- no training: the finished runs of earlier calls ----
        if overrides or args.iterations or args.minutes or args.seeds != 1 or args.nproc != 1 or args.out:
            raise RunError("argument error: --collect trains nothing and writes no output folder: drop key=value, "
                           "--seeds, --iterations, --minutes, --nproc and --out")
        folders = [Path(f) for f in args.collect]
        for folder in folders:
            if not folder.is_dir():
                raise RunError(f"argument error: --collect {folder}: no such folder")
        rows = [aggregate_cell(cell, [d for f in folders for d in sorted((f / cell.name).glob("seed*"))
                                      if d.is_dir()]) for cell in cells]
        print(markdown_table(spec, rows, command))
        if readme is not None:
            write_readme(readme, spec, rows, argv, prog)
        return rows

    out = Path(args.out or f"runs/tables/{spec.name}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"table {spec.name}: {spec.title} | {len(cells)} cells x {args.seeds} seeds | writing to {out.resolve()}")
    iterations, plan = plan_iterations(cells, overrides, out, args.iterations, args.minutes, args.nproc)

    # ---- training: every cell and seed (a two-stage cell: stage 1 with early stopping, then its retraining) ----
    for cell in cells:
        schedule_args = [] if iterations[cell.name] is None else [f"train.iterations={iterations[cell.name]}"]
        for seed in range(args.seeds):
            run_dir, base = out / cell.name / f"seed{seed}", [f"preset={cell.preset}", *cell.overrides, *overrides]
            if not cell.retrain:
                train_process([*base, *schedule_args, f"seed={seed}"], run_dir, args.nproc)
                continue
            first = stage1_dir(run_dir)  # stage 1: the preset with early stopping on the validation loss
            train_process([*base, *schedule_args, f"seed={seed}"], first, args.nproc)
            try:
                stage2 = retrain_args(cell, first)
            except ValueError as error:
                raise RunError(f"table error: cell {cell.name}: {error}") from None
            print(f"cell {cell.name} seed {seed}: stage 2 retrains with {' '.join(stage2)}", flush=True)
            train_process([*base, *stage2, f"seed={seed}"], run_dir, args.nproc)  # stage 2, tested: from scratch

    # ---- the table ----
    rows = [aggregate_cell(cell, [out / cell.name / f"seed{seed}" for seed in range(args.seeds)]) for cell in cells]
    markdown = markdown_table(spec, rows, command)
    atomic_write_text(out / "table.md", markdown)
    atomic_write_text(out / "table.json", json.dumps(
        {"table": spec.name, "title": spec.title, "source": spec.source, "command": command, "seeds": args.seeds,
         "plan": {c.name: plan.get(c.name) for c in cells if c.name in plan}, "rows": rows}, indent=2))
    plot_table(spec, rows, out / "table.png")
    print(markdown)
    if readme is not None:
        write_readme(readme, spec, rows, argv, prog)
    print(f"table: {(out / 'table.md').resolve()}  json: {(out / 'table.json').resolve()}  "
          f"figure: {(out / 'table.png').resolve()}")
    return rows
