"""Sweeps on the command line: ``seed=0,1,2`` (and any other ``key=a,b`` list) runs one run per value.

As Hydra's multirun does: the comma lists of a command line expand into their cartesian product, each run goes
into a sibling folder ``<out_dir>/<key>=<value>,...`` (``out_dir`` defaults to ``runs/<preset>-sweep``), and one
line sums them up: the mean test accuracy, the std over runs and each run's accuracy with its 95% CI.
A value in brackets or braces (``data.rotations=[0,90]``, ``inner.options={clip: 1.0}``) is one value, not a list.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meta.training.config import ConfigError
from meta.training.errors import RunError
from meta.training.run import DEFAULT_PRESET, load_config, train


def sweep_axes(args: list[str]) -> dict[str, list[str]]:
    """``key -> values`` for every ``key=a,b,...`` argument (a list of at least two values), in command-line order."""
    axes: dict[str, list[str]] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and "," in value and value[:1] not in "[{'\"":
            values = [v.strip() for v in value.split(",")]
            if key == "out_dir" or any(not v for v in values):
                raise ValueError(f"{arg!r}: a sweep needs non-empty values, and out_dir cannot be swept")
            axes[key] = values
    return axes


def expand_sweep(args: list[str], base_out: str) -> list[tuple[str, list[str]]]:
    """``(folder name, arguments)`` of every run of the sweep, each writing to ``base_out/<folder name>``."""
    axes = sweep_axes(args)
    fixed = [a for a in args if a.partition("=")[0] not in axes and a.partition("=")[0] != "out_dir"]
    runs = []
    for values in itertools.product(*axes.values()):
        assignment = [f"{key}={value}" for key, value in zip(axes, values)]
        name = ",".join(assignment)
        runs.append((name, [*fixed, *assignment, f"out_dir={Path(base_out) / name}"]))
    return runs


def summarize_sweep(base_out: Path, names: list[str]) -> dict[str, Any]:
    """Mean test accuracy over the runs that finished, the std over them (n-1) and each run's accuracy ± CI."""
    runs = {}
    for name in names:
        path = base_out / name / "results.json"
        if path.is_file():
            test = json.loads(path.read_text())["test"]
            runs[name] = {"accuracy": test["accuracy"], "ci95": test["ci95"]}
    accuracies = [r["accuracy"] for r in runs.values()]
    mean = sum(accuracies) / len(accuracies) if accuracies else None
    std = (math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1))
           if len(accuracies) > 1 else None)
    return {"runs": runs, "finished": len(runs), "planned": len(names), "mean": mean, "std": std}


def summary_line(summary: dict[str, Any]) -> str:
    """One line: mean ± std over runs, then each run's accuracy ± its task CI."""
    if summary["mean"] is None:
        return f"sweep: none of {summary['planned']} runs finished"
    std = "" if summary["std"] is None else f" ± {summary['std']:.2f} (std over runs)"
    each = "; ".join(f"{name}: {r['accuracy']:.2f} ± {r['ci95']:.2f}" for name, r in summary["runs"].items())
    return (f"sweep: {summary['mean']:.2f}%{std} over {summary['finished']}/{summary['planned']} runs | "
            f"each (95% task CI): {each}")


def train_sweep(args: Sequence[str], command: str = "meta-train") -> list[str]:
    """Run the sweep of a command line's comma lists (``seed=0,1,2``): one run per combination, one after another,
    each into ``<out_dir>/<key>=<value>,...`` (``out_dir`` defaults to ``runs/<preset>-sweep``), then print one
    summary line. Every combination's config is checked before the first run. Returns the names of the runs that
    failed (each printed its one-line error); raises :class:`RunError` for a bad config."""
    runs = expand_sweep(list(args), "")
    try:  # every combination's config is checked before the first run starts
        configs = [load_config(DEFAULT_PRESET, [a for a in run_args if not a.startswith("out_dir=")])
                   for _, run_args in runs]
    except ConfigError as error:
        raise RunError(f"config error: {error}") from None
    named = dict(a.split("=", 1) for a in args if "=" in a)
    base_out = Path(named.get("out_dir") or f"runs/{configs[0].preset}-sweep")
    failed = []
    for name, run_args in expand_sweep(list(args), str(base_out)):
        print(f"==== sweep run {name} -> {base_out / name}", flush=True)
        try:
            train(load_config(DEFAULT_PRESET, run_args), overrides=run_args,
                  command=" ".join([command, *run_args]))
        except (RunError, ConfigError) as error:
            print(error if isinstance(error, RunError) else f"config error: {error}", file=sys.stderr, flush=True)
            failed.append(name)
    print(summary_line(summarize_sweep(base_out, [name for name, _ in runs])))
    return failed
