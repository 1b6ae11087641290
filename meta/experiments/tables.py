"""Paper tables: the spec format of ``experiments/tables/*.yaml`` and the logic of ``scripts/reproduce.py``.

A table spec names, per cell, the preset that reproduces it, the paper's number and what its ± means, the source,
the protocol knobs the preset must pin, and the known deviations: parts of the original protocol that no config
key expresses yet (such a cell is labelled ``deviates: ...`` whatever its run did, never ``as published``).
The runner trains every cell and seed with ``scripts/train_maml.py``
into ``<out>/<cell>/seed<k>``; the functions here load specs, decide what a run folder needs, label each run's
protocol against its preset, and aggregate finished runs into the table (Markdown, JSON, figure).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from meta.training.builders import test_inner_steps
from meta.training.config import CONFIG_DIR, ConfigError, available_presets, load_config, with_defaults

#: what the paper's ± is: a 95% CI over test tasks, a std over seeds, a ± the paper prints without saying what it is
#: (``unstated``), or none
PM_KINDS = ("task_ci95", "seed_std", "unstated", "none")
#: config keys that never change what a run measures: run control, paths, the seed (seeds are the table's axis), and
#: the paper's number the run is shown next to (``reference.*``: a cell may name another row of the same preset).
#: Not train.cuda_graph: a graphed run steps with capturable Adam, and its equality with eager steps has not yet
#: passed its GPU test (experiments/benchmarks/h200), so a graphed run shows it in its protocol column.
IGNORED_KEYS = ("seed", "device", "out_dir", "resume", "progress", "data.root", "data.cache_dir", "preset",
                "dist.timeout_s", "log.tensorboard")
IGNORED_PREFIXES = ("reference.",)
#: --minutes: a short timed run per cell; its first log window (the auto driver's choice, warm-up) is dropped
PROBE_ITERATIONS, PROBE_LOG_EVERY = 12, 4
_CELL_KEYS = {"name", "preset", "overrides", "paper", "paper_step", "source", "requires", "deviations", "retrain"}
#: what the runner adds to a two-stage cell's retraining (stage 2) besides the cell's ``retrain`` overrides: its
#: iterations from stage 1 (:func:`retrain_iterations`), no early stopping, and one validation, at its end, for the
#: log (ProtoNets' trainval run has no validation loader: prototypical-networks train.py L39-42)
RETRAIN_KEYS = ("train.iterations", "train.early_stop_patience", "train.val_every")
_MISSING = object()


class TableError(ValueError):
    """A table spec is malformed, names a preset that does not exist, or a preset does not pin what it requires."""


@dataclass
class Cell:
    """One number of a paper table and the preset that reproduces it."""

    name: str
    preset: str
    paper_accuracy: float
    paper_pm: float | None  # the ± printed next to it (null when the paper gives none, or see pm_note)
    pm_kind: str  # one of PM_KINDS
    source: dict[str, str]  # paper, table, code
    # key=value applied on top of the preset: part of the cell's protocol (e.g. eval.transductive=false for the
    # non-transductive row of a preset), so its pins are checked and its runs labelled with them applied
    overrides: list[str] = field(default_factory=list)
    requires: dict[str, Any] = field(default_factory=dict)  # knobs the preset must pin, key: value
    # parts of the original protocol that no config key expresses yet, each a sentence naming the code it cites
    deviations: list[str] = field(default_factory=list)
    # two-stage cells (ProtoNets' run_trainval.py): key=value of the retraining run, which trains from scratch for
    # the number of iterations stage 1's early stopping gives (retrain_iterations) and is the one tested; empty:
    # one stage
    retrain: list[str] = field(default_factory=list)
    # the test-time inner step whose accuracy the paper printed, where the code records every step (cbfinn/maml's
    # test() writes steps 0..10 and the paper's text names the column): ours is read from that column of the runs'
    # per-step record (results.json test.steps), with the accuracy after the last step beside it; null: the last
    paper_step: int | None = None
    # what the paper's ± is, in words, where the spec records its kind but not its value (``pm: null`` with a
    # ``pm_kind`` other than none: e.g. MAML++'s std over 3 runs, whose values were not verified from the paper)
    pm_note: str | None = None


@dataclass
class TableSpec:
    """A paper table: title, source and its cells."""

    name: str  # the file's stem
    title: str
    source: str
    cells: list[Cell]


def load_table(path: Path | str) -> TableSpec:
    """Read and check a table spec; every problem is a :class:`TableError` naming the cell and key."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"no table spec at {path}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or not {"title", "source", "cells"} <= set(raw):
        raise TableError(f"{path}: a table spec needs the keys title, source and cells")
    cells, defaults = [], load_config([])
    for i, item in enumerate(raw["cells"] or []):
        where = f"{path.name}: cell {item.get('name', i) if isinstance(item, dict) else i}"
        if not isinstance(item, dict) or not {"name", "preset", "paper", "source"} <= set(item):
            raise TableError(f"{where}: a cell needs name, preset, paper and source")
        if set(item) - _CELL_KEYS:
            raise TableError(f"{where}: unknown keys {sorted(set(item) - _CELL_KEYS)}; allowed: {sorted(_CELL_KEYS)}")
        paper = item["paper"]
        if not isinstance(paper, dict) or "accuracy" not in paper or paper.get("pm_kind") not in PM_KINDS:
            raise TableError(f"{where}: paper needs accuracy and pm_kind (one of {PM_KINDS})")
        pm_note = paper.get("pm_note")
        if pm_note is not None and (not isinstance(pm_note, str) or not pm_note.strip() or paper.get("pm") is not None
                                    or paper["pm_kind"] == "none"):
            raise TableError(f"{where}: paper.pm_note says what an unrecorded ± is: a sentence, with pm null and a "
                             f"pm_kind other than none")
        if paper.get("pm") is None and paper["pm_kind"] != "none" and pm_note is None:
            raise TableError(f"{where}: paper.pm must be given unless paper.pm_kind is none (or paper.pm_note says "
                             f"why its value is not recorded)")
        if paper.get("pm") is not None and paper["pm_kind"] == "none":
            raise TableError(f"{where}: paper.pm is given, so paper.pm_kind cannot be none")
        if not {"paper", "table", "code"} <= set(item["source"] or {}):
            raise TableError(f"{where}: source needs paper, table and code")
        overrides, retrain = list(item.get("overrides") or []), list(item.get("retrain") or [])
        bad = [o for o in overrides + retrain if not isinstance(o, str) or "=" not in o]
        if bad:
            raise TableError(f"{where}: overrides and retrain {bad} are not of the form key=value")
        runner_set = [o for o in retrain if o.split("=", 1)[0] in RETRAIN_KEYS]
        if runner_set:
            raise TableError(f"{where}: retrain sets {runner_set}, which the runner derives from stage 1 "
                             f"({', '.join(RETRAIN_KEYS)}); leave them out")
        requires = dict(item.get("requires") or {})
        deviations = item.get("deviations") or []
        if not isinstance(deviations, list) or not all(isinstance(d, str) and d.strip() for d in deviations):
            raise TableError(f"{where}: deviations must be a list of sentences (what differs from the original "
                             f"code and why no key expresses it)")
        unknown = [k for k in requires if OmegaConf.select(defaults, k, default=_MISSING) is _MISSING]
        if unknown:
            raise TableError(f"{where}: requires names {unknown}, which are not config keys")
        paper_step = item.get("paper_step")
        if paper_step is not None and (isinstance(paper_step, bool) or not isinstance(paper_step, int)
                                       or paper_step < 0):
            raise TableError(f"{where}: paper_step must be a non-negative integer (an inner-step column), got "
                             f"{paper_step!r}")
        if paper_step is not None and paper_step > load_config([f"preset={item['preset']}"]).inner.test_steps:
            raise TableError(f"{where}: paper_step={paper_step} is beyond the preset's inner.test_steps")
        cells.append(Cell(name=str(item["name"]), preset=str(item["preset"]), paper_accuracy=float(paper["accuracy"]),
                          paper_pm=None if paper.get("pm") is None else float(paper["pm"]),
                          pm_kind=paper["pm_kind"], source=dict(item["source"]), overrides=overrides,
                          requires=requires, deviations=list(deviations), retrain=retrain, paper_step=paper_step,
                          pm_note=pm_note))
    names = [c.name for c in cells]
    if not cells or len(set(names)) != len(names):
        raise TableError(f"{path}: cells must be a non-empty list with distinct names, got {names}")
    return TableSpec(name=path.stem, title=str(raw["title"]), source=str(raw["source"]), cells=cells)


def select_cells(spec: TableSpec, only: list[str] | None) -> list[Cell]:
    """The cells named by ``--only`` (all of them without it); an unknown name is an error listing the names."""
    if not only:
        return spec.cells
    unknown = sorted(set(only) - {c.name for c in spec.cells})
    if unknown:
        raise TableError(f"--only {unknown}: not cells of {spec.name}; its cells: {[c.name for c in spec.cells]}")
    return [c for c in spec.cells if c.name in only]


def preset_exists(preset: str) -> bool:
    """Whether ``configs/<preset>.yaml`` exists."""
    return (CONFIG_DIR / f"{preset}.yaml").is_file()


def missing_pins(cell: Cell) -> list[str]:
    """The required knobs the cell's preset (with the cell's overrides) does not pin to the required value, as
    ``key=value (spec: v)``."""
    cfg = load_config([f"preset={cell.preset}", *cell.overrides])
    wrong = []
    for key, wanted in cell.requires.items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if value != wanted:
            wrong.append(f"{key}={value} (spec: {wanted})")
    return wrong


def check_cells(spec: TableSpec, cells: list[Cell], extra: list[str]) -> None:
    """Before anything runs: every preset exists and pins its required knobs, every override is a valid key."""
    for cell in cells:
        if not preset_exists(cell.preset):
            raise TableError(f"table {spec.name}, cell {cell.name}: preset {cell.preset!r} does not exist in "
                             f"configs/ yet (add it, or leave the cell out with --only); available: "
                             f"{', '.join(available_presets())}")
        wrong = missing_pins(cell)
        if wrong:
            raise TableError(f"table {spec.name}, cell {cell.name}: preset {cell.preset} does not pin what the "
                             f"table requires: {'; '.join(wrong)}")
        try:
            cfg = load_config([f"preset={cell.preset}", *cell.overrides, *extra])
            if cell.retrain:
                load_config([f"preset={cell.preset}", *cell.overrides, *extra, *cell.retrain])
        except ConfigError as error:
            raise TableError(f"table {spec.name}, cell {cell.name}: {error}") from None
        if cell.retrain and cfg.train.early_stop_patience is None:
            raise TableError(f"table {spec.name}, cell {cell.name}: a cell with retrain takes its retraining length "
                             f"from stage 1's early stopping, but train.early_stop_patience is null; set it in the "
                             f"preset {cell.preset}")


def train_command(script: Path, nproc: int = 1) -> list[str]:
    """The command that starts ``script`` (scripts/train_maml.py): plainly on one process, or through torchrun
    (``python -m torch.distributed.run --standalone``) on ``nproc`` processes of this machine, one run."""
    if nproc < 1:
        raise ValueError(f"--nproc must be positive, got {nproc}")
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return [sys.executable, *runner, str(script)]


def run_action(run_dir: Path) -> str:
    """What the runner does with a run folder: ``skip`` (results.json), ``resume`` (folder exists), or ``start``."""
    if (run_dir / "results.json").is_file():
        return "skip"
    return "resume" if run_dir.exists() else "start"


def stage1_dir(run_dir: Path) -> Path:
    """Where a two-stage cell's stage 1 (training with early stopping) runs, next to ``run_dir`` (stage 2, the
    tested run): ``<out>/<cell>/seed<k>_stage1``."""
    return run_dir.with_name(f"{run_dir.name}_stage1")


def retrain_iterations(best_step: int, patience: int, val_every: int) -> int:
    """The iterations of ProtoNets' retraining on train+val after a stage-1 run with early stopping.

    jakesnell/prototypical-networks scripts/train/few_shot/trainval.py L14 ``best_epoch = argmin`` of the
    validation losses (one per epoch, counted from 0) and L25 ``train.epochs = best_epoch + patience``. One of our
    validations (every ``val_every`` iterations, and at a run's last step) is one of its epochs: the best
    validation at ``best_step`` is number ``ceil(best_step / val_every) - 1`` from 0, and the retraining trains
    ``(that + patience) * val_every`` iterations."""
    if best_step <= 0 or val_every <= 0 or patience < 0:
        raise ValueError(f"stage 1 recorded no best validation (best_step={best_step}, val_every={val_every}, "
                         f"patience={patience})")
    iterations = (-(-best_step // val_every) - 1 + patience) * val_every
    if iterations <= 0:
        raise ValueError(f"stage 1's best validation loss was its first (step {best_step}) and patience is 0: the "
                         f"original code would retrain for 0 epochs; use a positive train.early_stop_patience")
    return iterations


def retrain_args(cell: Cell, first: Path) -> list[str]:
    """The key=value of a two-stage cell's stage 2 from its finished stage-1 run folder ``first``: the cell's
    ``retrain`` and the :data:`RETRAIN_KEYS` (iterations from :func:`retrain_iterations`)."""
    results = json.loads((first / "results.json").read_text())
    record = results.get("early_stop")
    if record is None:
        raise ValueError(f"{first}/results.json has no early_stop record: stage 1 ran without "
                         f"train.early_stop_patience")
    val_every = OmegaConf.load(first / "config.yaml").train.val_every
    n = retrain_iterations(record["best_step"], record["patience"], val_every)
    return [*cell.retrain, f"train.iterations={n}", "train.early_stop_patience=null", f"train.val_every={n}"]


def iterations_for_minutes(records: list[dict[str, Any]], minutes: float, cap: int) -> tuple[int, float]:
    """Iterations that train for about ``minutes`` at the rate a probe run logged, at most ``cap``; and that rate.

    ``records`` are a probe's metrics.jsonl lines; the first training window is dropped (it holds the ``auto``
    driver's timing of its candidates and the first-step warm-up).
    """
    train = [r for r in records if r.get("split") == "train"]
    if len(train) < 2 or minutes <= 0:
        raise ValueError("the probe logged no timed training window after the first (or minutes <= 0)")
    steps = [b["step"] - a["step"] for a, b in zip(train, train[1:])]  # the iterations of each later window
    seconds = sum(n / r["its_per_s"] for n, r in zip(steps, train[1:]))
    rate = sum(steps) / seconds
    return max(1, min(cap, round(minutes * 60 * rate))), rate


def _flat(cfg: DictConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def protocol_status(
    preset: str, run_config: DictConfig, known: list[str] | tuple[str, ...] = (), expected: list[str] | None = None
) -> dict[str, Any]:
    """How a run's resolved config departs from its preset: a label, the iterations, and every other changed key.

    Label ``as published`` (nothing but seed, device, paths and progress differs), ``reduced schedule (N of M
    iterations)`` (only fewer iterations), or ``deviates: key=value (preset: v); ...`` (anything else, with the
    schedule noted too). ``known``: the cell's deviations that no key expresses; they come first, marked ``(no
    knob)``, and make the label ``deviates`` even when the run pinned everything its preset does. ``expected``:
    key=value the protocol applies on top of the preset (its cell's ``overrides``, a two-stage cell's retraining),
    no deviation.
    """
    ours = _flat(with_defaults(run_config))  # keys the run's config lacks: as their defaults
    theirs = _flat(load_config([f"preset={preset}", *(expected or [])]))
    keys = [k for k in sorted(set(ours) | set(theirs))
            if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES) and k != "train.iterations"]
    deviations = [f"{d} (no knob)" for d in known]
    deviations += [f"{k}={ours.get(k)} (preset: {theirs.get(k)})" for k in keys if ours.get(k) != theirs.get(k)]
    iterations, planned = ours["train.iterations"], theirs["train.iterations"]
    schedule = None
    if iterations < planned:
        schedule = f"reduced schedule ({iterations} of {planned} iterations)"
    elif iterations > planned:
        deviations.insert(len(known), f"train.iterations={iterations} (preset: {planned})")
    return {"label": _label(deviations, schedule), "deviations": deviations, "schedule": schedule,
            "iterations": iterations, "preset_iterations": planned}


def _label(deviations: list[str], schedule: str | None) -> str:
    if deviations:
        return "deviates: " + "; ".join(deviations) + (f"; {schedule}" if schedule else "")
    return schedule or "as published"


def run_status(cell: Cell, run_dir: Path) -> dict[str, Any]:
    """:func:`protocol_status` of a finished run of ``cell``. A two-stage cell's run is judged by both stages:
    stage 1 against the preset (its schedule gives the label's, unless early stopping ended it before a reduced
    ``train.iterations`` mattered: a ``constant`` or ``step`` meta-lr schedule does not depend on it), stage 2
    against the preset with the retraining's keys (:func:`retrain_args`); the deviations of both, each once."""
    config = OmegaConf.load(run_dir / "config.yaml")
    if not cell.retrain:
        return protocol_status(cell.preset, config, cell.deviations, cell.overrides)
    first = stage1_dir(run_dir)
    one = protocol_status(cell.preset, OmegaConf.load(first / "config.yaml"), cell.deviations, cell.overrides)
    two = protocol_status(cell.preset, config, (), expected=[*cell.overrides, *retrain_args(cell, first)])
    deviations = one["deviations"] + [d for d in two["deviations"]
                                      if d not in one["deviations"] and not d.startswith("train.iterations=")]
    if two["iterations"] != two["preset_iterations"]:
        deviations.append(f"retraining train.iterations={two['iterations']} (stage 1 gives "
                          f"{two['preset_iterations']})")
    stage1 = json.loads((first / "results.json").read_text())["early_stop"]
    schedule = one["schedule"]
    if stage1["stopped"] and OmegaConf.load(first / "config.yaml").train.lr_schedule in ("constant", "step"):
        schedule = None  # early stopping ended stage 1 before its (reduced) cap: the cap changed nothing
    return {**one, "label": _label(deviations, schedule), "deviations": deviations, "schedule": schedule,
            "stage1": {"best_step": stage1["best_step"], "steps_trained": stage1["steps_trained"],
                       "stopped_early": stage1["stopped"], "retrain_iterations": config.train.iterations}}


def aggregate_cell(cell: Cell, run_dirs: list[Path]) -> dict[str, Any]:
    """One table row from the finished runs of a cell (run folders without results.json are left out, and counted).

    Ours: the mean test accuracy over seeds, each seed's 95% task CI and their mean, and the std over seeds
    (sample std, n-1; null for one seed). ``within_paper``: our mean lies in the paper's number ± its ±.
    """
    done = [d for d in run_dirs if (d / "results.json").is_file()]
    row: dict[str, Any] = {
        "cell": cell.name, "preset": cell.preset, "paper": cell.paper_accuracy, "paper_pm": cell.paper_pm,
        "pm_kind": cell.pm_kind, "pm_note": cell.pm_note, "source": cell.source, "seeds_done": len(done),
        "seeds_planned": len(run_dirs),
        "known_deviations": cell.deviations,
    }
    if not done:
        return {**row, "accuracy": None, "protocol": "not run", "within_paper": None}
    results = [json.loads((d / "results.json").read_text()) for d in done]
    configs = [OmegaConf.load(d / "config.yaml") for d in done]
    statuses = [run_status(cell, d) for d in done]
    columns = [paper_column(cell, r["test"]) for r in results]
    accuracies = [c["accuracy"] for c in columns]
    mean = sum(accuracies) / len(accuracies)
    std = (math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1))
           if len(accuracies) > 1 else None)
    labels = sorted({s["label"] for s in statuses})
    unrecorded = sum(c["step"] is None for c in columns) if cell.paper_step is not None else 0
    if unrecorded:  # ours is then the last step's accuracy, and the protocol column says so
        labels = [f"{label}; step {cell.paper_step} not recorded in {unrecorded} run(s) (no per-step record): "
                  f"ours after the last step" for label in labels]
    within = None if cell.paper_pm is None else abs(mean - cell.paper_accuracy) <= cell.paper_pm
    last = [r["test"]["accuracy"] for r in results]
    return {
        **row, "accuracy": mean, "std_over_seeds": std, "paper_step": cell.paper_step,
        "step": columns[0]["step"] if not unrecorded else None,
        "last_step": sorted({test_inner_steps(c) for c in configs}),  # inner.test_steps, else inner.steps
        "last_step_accuracy": sum(last) / len(last),
        "last_step_ci95_mean": sum(r["test"]["ci95"] for r in results) / len(results),
        "seeds": [{"seed": c.seed, "accuracy": col["accuracy"], "ci95": col["ci95"], "step": col["step"],
                   "last_step_accuracy": r["test"]["accuracy"], "tasks": r["test"]["tasks"],
                   "train_wall_time_s": r.get("train_wall_time_s"), "config_hash": r.get("config_hash"),
                   "git_commit": r.get("git_commit"), "device": r.get("device"),
                   **({"stage1": st["stage1"]} if "stage1" in st else {})}
                  for r, c, st, col in zip(results, configs, statuses, columns)],
        "ci95_mean": sum(c["ci95"] for c in columns) / len(columns),
        "iterations": sorted({s["iterations"] for s in statuses}),
        "preset_iterations": statuses[0]["preset_iterations"],
        "protocol": " | ".join(labels), "within_paper": within,
    }


def paper_column(cell: Cell, test: dict[str, Any]) -> dict[str, Any]:
    """The accuracy and CI of a run's test result that the cell compares with the paper: after ``cell.paper_step``
    inner steps where the run recorded every step (``step`` says which), else after the last (``step`` None)."""
    if cell.paper_step is not None:
        for entry in test.get("steps", []):
            if entry["step"] == cell.paper_step:
                return {"accuracy": entry["accuracy"], "ci95": entry["ci95"], "step": cell.paper_step}
    return {"accuracy": test["accuracy"], "ci95": test["ci95"], "step": None}


def _pm(value: float | None, kind: str) -> str:
    """The paper's ± as the table prints it; ``± ?`` where the spec records its kind but not its value."""
    if kind == "none":
        return ""
    number = "?" if value is None else f"{value:.2f}"
    return f" ± {number}" + {"task_ci95": "", "seed_std": " (std)", "unstated": " (?)"}[kind]


def markdown_table(spec: TableSpec, rows: list[dict[str, Any]], command: str) -> str:
    """The table as Markdown: ours (mean ± mean task CI, std over seeds) next to the paper's, with the protocol."""
    lines = [
        f"# {spec.title}", "", f"Source: {spec.source}", "", f"Produced by `{command}`.", "",
        "Ours: mean test accuracy over seeds ± the mean of the seeds' 95% task CIs, after the inner step the paper "
        "printed where the spec names it (then the last step's beside it); std over seeds (n-1). "
        "Paper: its number ± its interval ((std) where the paper's ± is a std over seeds, (?) where the paper does "
        "not say what its ± is)." + (" ± ?: the spec records the kind of the paper's ± but not its value (see Sources)."
                                  if any(r.get("pm_note") for r in rows) else ""), "",
        "| cell | preset | ours (%) | std over seeds | seeds | paper (%) | within paper's ± | protocol |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = "–" if r["accuracy"] is None else f"{r['accuracy']:.2f} ± {r['ci95_mean']:.2f}"
        if r["accuracy"] is not None and r.get("step") is not None:  # the paper's column, then the last step's
            steps = "/".join(map(str, r["last_step"]))
            ours += (f" (step {r['step']}; after {steps}: {r['last_step_accuracy']:.2f} ± "
                     f"{r['last_step_ci95_mean']:.2f})")
        std = "–" if r.get("std_over_seeds") is None else f"{r['std_over_seeds']:.2f}"
        within = {None: "–", True: "yes", False: "no"}[r["within_paper"]]
        paper = f"{r['paper']:.2f}{_pm(r['paper_pm'], r['pm_kind'])}"
        lines.append(f"| {r['cell']} | `{r['preset']}` | {ours} | {std} | {r['seeds_done']}/{r['seeds_planned']} "
                     f"| {paper} | {within} | {r['protocol']} |")
    lines += ["", "Sources:", ""]
    lines += [f"- {r['cell']}: {r['source']['paper']}, {r['source']['table']}; code: {r['source']['code']}"
              + (f"; the paper's ±: {r['pm_note']}" if r.get("pm_note") else "") for r in rows]
    iterations = [f"{r['cell']}: {', '.join(map(str, r['iterations']))}" for r in rows if r.get("iterations")]
    if iterations:
        lines += ["", "Training iterations per cell (pass `--only CELL --iterations N` to repeat one): "
                  + "; ".join(iterations) + "."]
    return "\n".join(lines) + "\n"


def plot_table(spec: TableSpec, rows: list[dict[str, Any]], path: Path) -> None:
    """Ours against the paper's number per cell, with error bars (ours: mean task CI; paper: its ±)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 4))
    ax.errorbar([i - 0.1 for i in x], [r["paper"] for r in rows], yerr=[r["paper_pm"] or 0 for r in rows],
                fmt="s", capsize=4, label="paper")
    done = [(i, r) for i, r in zip(x, rows) if r["accuracy"] is not None]
    ax.errorbar([i + 0.1 for i, _ in done], [r["accuracy"] for _, r in done],
                yerr=[r["ci95_mean"] for _, r in done], fmt="o", capsize=4, label="ours (mean task CI)")
    ax.set_xticks(x, [r["cell"] for r in rows], rotation=30, ha="right")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(spec.title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- tables written into a Markdown file (the README's Results section) ------------------------------------


def readme_markers(table: str) -> tuple[str, str]:
    """The two lines between which :func:`replace_block` writes ``table``'s rows in a Markdown file."""
    return f"<!-- reproduce.py {table} -->", f"<!-- end reproduce.py {table} -->"


def readme_block(spec: TableSpec, rows: list[dict[str, Any]], command: str) -> str:
    """The rows of :func:`markdown_table` (header, rows, iterations line) under a line naming the command."""
    full = markdown_table(spec, rows, command).splitlines()
    start = next(i for i, line in enumerate(full) if line.startswith("| cell |"))
    table = []
    for line in full[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    iterations = [line for line in full if line.startswith("Training iterations per cell")]
    return "\n".join([f"Written by `{command}`; do not edit by hand.", "", *table, "", *iterations]).rstrip() + "\n"


def replace_block(text: str, table: str, block: str) -> str:
    """``text`` with the lines between ``table``'s two markers (:func:`readme_markers`) replaced by ``block``."""
    begin, end = readme_markers(table)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise TableError(f"the file must hold the line {begin} once, followed by the line {end} once; add them where "
                         f"the table goes")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}{end}{tail}"
