"""The command lines: ``meta-train``, ``meta-evaluate`` and ``meta-reproduce`` (console entry points), the same
functions that ``python scripts/train_maml.py``, ``scripts/evaluate.py`` and ``scripts/reproduce.py`` call.

Each reads its arguments, calls the package (:func:`meta.train`, :func:`meta.evaluate`, the table runner) and
returns the exit status: 0, or the one-line message of a :class:`~meta.training.errors.RunError` (which
``sys.exit`` prints, exiting with status 1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

TRAIN_USAGE = """Train and evaluate a meta-learner.

    {prog}                                   # the default: Omniglot 5w1s, short CPU run
    {prog} preset=maml_omniglot_5w1s seed=1  # a paper preset
    {prog} preset=maml_omniglot_20w1s train.iterations=100 driver=loop out_dir=runs/x

Every key of meta/training/config.py can be overridden as key=value: --help lists them all with their types,
defaults, allowed values and meanings, and the presets; --show-config prints the resolved config and exits.
A comma list sweeps: seed=0,1,2 runs one run per value into out_dir/seed=0, ... and prints one summary line.
Outputs in out_dir: config.yaml, metrics.jsonl, checkpoint.pt, best.pt, curves.png, results.json (and with
eval.checkpoint=ensemble the top validation checkpoints top_step*.pt).
Ctrl-C, SIGTERM (a scheduler's) and SIGHUP (a closed terminal) finish the current step, save a checkpoint and
exit with status 1; the same command plus resume=true continues the run (Slurm: sbatch --signal=TERM@120 sends
SIGTERM two minutes before the time limit, and a requeued job's script can append resume=true).
One process at a time uses a run folder (an OS lock on out_dir/.lock, released when the process ends in any way):
a second one is refused, naming the first.
Several processes, GPUs or machines: python -m torch.distributed.run --nproc_per_node N {script} ...
(one run; rank 0 writes every output; see docs/reproducing.md#scaling-out).
"""

EVALUATE_USAGE = """Evaluate a saved run on its fixed test tasks.

    {prog} runs/omniglot_5w1s_quick-seed0/best.pt
    {prog} runs/x/checkpoint.pt eval.tasks=1000 device=cpu
    {prog} runs/x               # a run folder: the checkpoint(s) its eval.checkpoint names
    {prog} runs/x eval.checkpoint=ensemble eval.ensemble_size=3

The config is the one stored in the checkpoint; key=value arguments may change only what applies to a saved run
(meta.training.config.EVAL_KEYS: eval.*, data.root, data.test_dataset, device, inner.test_lr, ...); other keys
(preset, model, task.ways, inner.rule, ...) are refused.
A run folder is tested as its eval.checkpoint says: best (best.pt), last (checkpoint.pt) or ensemble (the top
validation checkpoints top_step*.pt that the run kept, as its checkpoint.pt lists them; eval.ensemble_size may
take fewer of them, not more).
Prints accuracy ± 95% CI and writes <checkpoint dir>/results_<checkpoint name>.json (an ensemble:
<folder>/results_ensemble.json).
"""


def _program(prog: str | None, default: str) -> str:
    return prog if prog is not None else default


def train(argv: Sequence[str] | None = None, prog: str | None = None, command: str | None = None) -> int | str:
    """``meta-train key=value ...``: one run (or a sweep of comma lists) of :func:`meta.train`; ``--help`` lists
    every key and preset, ``--show-config`` prints the resolved config. Returns the exit status (0 or a message)."""
    from omegaconf import OmegaConf

    from meta.experiments.sweep import sweep_axes, train_sweep
    from meta.training.cli_help import info_text
    from meta.training.config import ConfigError
    from meta.training.distributed import DistributedError, torchrun_world
    from meta.training.errors import RunError
    from meta.training.run import DEFAULT_PRESET, load_config
    from meta.training.run import train as train_run

    args = list(sys.argv[1:] if argv is None else argv)
    prog = _program(prog, "meta-train")
    command = command if command is not None else " ".join([prog, *args])
    script = "scripts/train_maml.py" if prog.startswith("python") else "-m meta.cli train"
    info = info_text(TRAIN_USAGE.format(prog=prog, script=script), args, DEFAULT_PRESET)
    if info is not None:  # --help (every key and preset, from meta/training/config.py) or --list-presets
        print(info)
        return 0
    try:
        sweep = sweep_axes(args)  # seed=0,1,2 and other comma lists
    except ValueError as error:
        return f"config error: {error}"
    if sweep and torchrun_world() > 1:
        return ("config error: a sweep (comma list) starts one run after another; under torchrun launch one run per "
                "command, or run the sweep without torchrun")
    try:
        if sweep:  # one run per combination, each in a sibling folder, then one summary line
            failed = train_sweep(args, command=prog)
            return f"sweep: runs failed: {', '.join(failed)}" if failed else 0
        overrides = [a for a in args if a != "--show-config"]
        try:
            cfg = load_config(DEFAULT_PRESET, overrides)
        except ConfigError as error:
            return f"config error: {error}"
        if "--show-config" in args:  # the resolved config of this command line; nothing runs
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        train_run(cfg, overrides=overrides, command=command)
        return 0
    except RunError as error:
        return str(error)
    except DistributedError as error:  # a failed collective (a rank died or hangs): its message, no traceback
        print(f"distributed error: {error}", file=sys.stderr, flush=True)
        return 1


def evaluate(argv: Sequence[str] | None = None, prog: str | None = None) -> int | str:
    """``meta-evaluate CHECKPOINT_OR_RUN_FOLDER key=value ...``: :func:`meta.evaluate`. Returns the exit status."""
    from meta.training.config import EVAL_KEYS
    from meta.training.distributed import torchrun_world
    from meta.training.errors import RunError
    from meta.training.run import evaluate as evaluate_run

    args = list(sys.argv[1:] if argv is None else argv)
    prog = _program(prog, "meta-evaluate")
    usage = EVALUATE_USAGE.format(prog=prog)
    if {"-h", "--help"} & set(args):
        train_prog = "python scripts/train_maml.py" if prog.startswith("python") else "meta-train"
        print(f"{usage.strip()}\n\nKeys that apply to a saved run: {', '.join(EVAL_KEYS)} (meanings: "
              f"{train_prog} --help)")
        return 0
    if not args or "=" in args[0]:
        return usage
    if torchrun_world() > 1:
        name = prog.removeprefix("python ")
        return (f"{name} runs on one process; start it without torchrun (training under torchrun already shards "
                f"its validation and test tasks)")
    try:
        evaluate_run(Path(args[0]), args[1:])
    except RunError as error:
        return str(error)
    return 0


def reproduce(argv: Sequence[str] | None = None, prog: str | None = None) -> int | str:
    """``meta-reproduce TABLE [--seeds N] [--minutes M | --iterations N] ...``: train every cell and seed of a table
    spec and write the table (:mod:`meta.experiments.reproduce`). Returns the exit status."""
    from meta.experiments.reproduce import REPRODUCE_USAGE, reproduce_table
    from meta.training.errors import RunError

    args = list(sys.argv[1:] if argv is None else argv)
    prog = _program(prog, "meta-reproduce")
    overrides = [a for a in args if "=" in a and not a.startswith("-")]  # key=value for every run
    parser = argparse.ArgumentParser(prog=prog, description=REPRODUCE_USAGE.format(prog=prog),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="a table spec: a name in experiments/tables/ or a path to a .yaml file")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per cell (default 1)")
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument("--iterations", type=int, help="training iterations of every run (default: the preset's)")
    schedule.add_argument("--minutes", type=float,
                          help="choose each cell's iterations for about M minutes of training")
    parser.add_argument("--only", nargs="+", metavar="CELL", help="run and tabulate only these cells")
    parser.add_argument("--out", help="output folder (default runs/tables/<table>)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per run (default 1): N > 1 launches each run through torchrun on N processes "
                             "of this machine (GPUs or CPU cores; docs/reproducing.md#scaling-out)")
    parser.add_argument("--collect", nargs="+", metavar="FOLDER",
                        help="train nothing: tabulate the finished runs in these output folders of earlier runner "
                             "calls")
    parser.add_argument("--readme", metavar="FILE",
                        help="also write the table rows into FILE between <!-- reproduce.py TABLE --> and "
                             "<!-- end reproduce.py TABLE -->")
    parsed = parser.parse_args([a for a in args if a not in overrides])
    try:
        reproduce_table(parsed, overrides, args, prog)
    except RunError as error:
        return str(error)
    return 0


def main(argv: Sequence[str] | None = None) -> int | str:
    """``python -m meta.cli train|evaluate|reproduce ...``: the command named first, with the rest."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train, "evaluate": evaluate, "reproduce": reproduce}
    if not args or args[0] not in commands:
        return f"usage: python -m meta.cli {{{','.join(commands)}}} ..."
    return commands[args[0]](args[1:], prog=f"python -m meta.cli {args[0]}")


if __name__ == "__main__":
    sys.exit(main())
