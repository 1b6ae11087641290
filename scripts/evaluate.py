"""Evaluate a saved run on its fixed test tasks.

    python scripts/evaluate.py runs/omniglot_5w1s_quick-seed0/best.pt
    python scripts/evaluate.py runs/x/checkpoint.pt eval.tasks=1000 device=cpu
    python scripts/evaluate.py runs/x               # a run folder: the checkpoint(s) its eval.checkpoint names
    python scripts/evaluate.py runs/x eval.checkpoint=ensemble eval.ensemble_size=3

The config is the one stored in the checkpoint; key=value arguments may change only what applies to a saved run
(meta.training.config.EVAL_KEYS: eval.*, data.root, data.test_dataset, device, inner.test_lr, ...); other keys
(preset, model, task.ways, inner.rule, ...) are refused.
A run folder is tested as its eval.checkpoint says: best (best.pt), last (checkpoint.pt) or ensemble (the top
validation checkpoints top_step*.pt that the run kept, as its checkpoint.pt lists them; eval.ensemble_size may
take fewer of them, not more).
Prints accuracy ± 95% CI and writes <checkpoint dir>/results_<checkpoint name>.json (an ensemble:
<folder>/results_ensemble.json).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from meta.data import DataError
from meta.evaluation import evaluate_learner, records_every_step
from meta.training.builders import (
    build_inner_rule,
    build_learner,
    build_sampler,
    check_test_rule,
    resolve_device,
    resolve_dtype,
    test_inner_steps,
)
from meta.training.config import EVAL_KEYS, ConfigError, check_eval_overrides, load_config
from meta.training.distributed import torchrun_world
from meta.training.run_log import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    load_learner_state,
    run_metadata,
    to_json,
    top_checkpoint_path,
)


def ensemble_members(folder: Path, state: dict, cfg: DictConfig) -> list[dict]:
    """The top validation checkpoints of the run in ``folder`` to ensemble (``{"step", "accuracy"}``, best first):
    the first ``eval.ensemble_size`` of those its newest checkpoint lists. A ValueError names what is missing."""
    trained = state["config"].get("eval", {})
    if trained.get("checkpoint") != "ensemble":
        raise ValueError(f"eval.checkpoint=ensemble, but the run in {folder} kept no top validation checkpoints (it "
                         f"trained with eval.checkpoint={trained.get('checkpoint')}); test it with "
                         f"eval.checkpoint=best or last, or train with eval.checkpoint=ensemble")
    if cfg.eval.ensemble_size > trained["ensemble_size"]:
        raise ValueError(f"eval.ensemble_size={cfg.eval.ensemble_size}, but the run in {folder} kept its top "
                         f"{trained['ensemble_size']} validation checkpoints (eval.ensemble_size in training); pass "
                         f"eval.ensemble_size={trained['ensemble_size']} or less")
    if not state.get("top"):
        raise ValueError(f"the run in {folder} has no validation before its step-{state['step']} checkpoint, so no top "
                         f"checkpoint to ensemble yet; continue it (resume=true) or test it with eval.checkpoint=last")
    return state["top"][: cfg.eval.ensemble_size]

if {"-h", "--help"} & set(sys.argv[1:]):
    print(f"{__doc__.strip()}\n\nKeys that apply to a saved run: {', '.join(EVAL_KEYS)} (meanings: "
          f"python scripts/train_maml.py --help)")
    sys.exit(0)
if len(sys.argv) < 2 or "=" in sys.argv[1]:
    sys.exit(__doc__)
if torchrun_world() > 1:
    sys.exit("scripts/evaluate.py runs on one process; start it without torchrun (training under torchrun already "
             "shards its validation and test tasks)")
path = Path(sys.argv[1])
folder = path.is_dir()  # a run folder: its checkpoint.pt holds the config and the list of top checkpoints
try:
    check_eval_overrides(sys.argv[2:])
except ConfigError as error:
    sys.exit(f"config error: {error}")
try:
    state = load_checkpoint(path / "checkpoint.pt" if folder else path)
except CheckpointError as error:
    sys.exit(f"checkpoint error: {error}")
try:
    cfg = load_config(sys.argv[2:], base=state["config"])
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
except (ConfigError, RuntimeError) as error:  # RuntimeError: device=cuda without a GPU
    sys.exit(f"config error: {error}")
if not folder and any(a.startswith("eval.checkpoint=") for a in sys.argv[2:]):
    sys.exit(f"config error: eval.checkpoint chooses among the checkpoints of a run folder; pass the folder "
             f"{path.parent} instead of the file {path.name}, or leave eval.checkpoint out to test this file")
try:
    members = ensemble_members(path, state, cfg) if folder and cfg.eval.checkpoint == "ensemble" else []
except ValueError as error:
    sys.exit(f"config error: {error}")
if folder and not members:
    path = path / ("best.pt" if cfg.eval.checkpoint == "best" else "checkpoint.pt")
    try:
        state = load_checkpoint(path)
    except CheckpointError as error:
        sys.exit(f"checkpoint error: {error}")
try:
    sampler = build_sampler(cfg, "test", device)
except DataError as error:  # missing or corrupt files
    sys.exit(f"data error: {error}")
except ValueError as error:  # a task shape the split cannot supply
    sys.exit(f"task error: {error}")

learner = build_learner(cfg, dtype, device)
tested = learner
try:
    if members:  # the ensemble, best first
        tested = [build_learner(cfg, dtype, device) for _ in members]
        for member, entry in zip(tested, members):
            file = top_checkpoint_path(path, entry["step"])
            load_learner_state(member, load_checkpoint(file, map_location=device), file)
    else:
        load_learner_state(learner, state, path)
except CheckpointError as error:
    sys.exit(f"checkpoint error: {error}")
test_rule = build_inner_rule(cfg, test=True)
try:
    check_test_rule(cfg, learner, test_rule)
except ValueError as error:  # an inner.test_lr that would change nothing
    sys.exit(f"config error: {error}")
start = time.perf_counter()
test = evaluate_learner(
    tested, sampler, num_tasks=cfg.eval.tasks, seed=cfg.eval.seed,
    batch_size=cfg.eval.batch_size, inner_steps=test_inner_steps(cfg),
    rule=test_rule, dtype=dtype, device=device, chunk_size=cfg.train.chunk_size, per_task=True,
    transductive=cfg.eval.transductive, per_step=records_every_step(tested, cfg.eval.transductive),
)
results = {"test": test, "checkpoint": str(path), "step": state["step"], **run_metadata(cfg, device),
           "test_wall_time_s": time.perf_counter() - start}
what = f"step {state['step']}"
if members:
    results["ensemble"] = members  # steps and validation accuracies, best first
    steps = ", ".join(str(e["step"]) for e in members)
    what = f"ensemble of the top {len(members)} validation checkpoints: steps {steps}"
out = path / "results_ensemble.json" if members else path.parent / f"results_{path.stem}.json"
atomic_write_text(out, to_json(results, indent=2))
print(f"test accuracy: {test['accuracy']:.2f} ± {test['ci95']:.2f}% over {test['tasks']} tasks ({what})")
print(f"results: {out}")
