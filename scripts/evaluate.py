"""Evaluate a saved run on its fixed test tasks.

    python scripts/evaluate.py runs/omniglot_5w1s_quick-seed0/best.pt
    python scripts/evaluate.py runs/x/checkpoint.pt eval.tasks=1000 device=cpu

The config is the one stored in the checkpoint; key=value arguments may change only what applies to a saved run
(meta.training.config.EVAL_KEYS: eval.*, data.root, data.test_dataset, device, inner.test_lr, ...); other keys
(preset, model, task.ways, inner.rule, ...) are refused.
Prints accuracy ± 95% CI and writes <checkpoint dir>/results_<checkpoint name>.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from meta.data import DataError
from meta.evaluation import evaluate_learner
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
)

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
try:
    check_eval_overrides(sys.argv[2:])
except ConfigError as error:
    sys.exit(f"config error: {error}")
try:
    state = load_checkpoint(path)
except CheckpointError as error:
    sys.exit(f"checkpoint error: {error}")
try:
    cfg = load_config(sys.argv[2:], base=state["config"])
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
except (ConfigError, RuntimeError) as error:  # RuntimeError: device=cuda without a GPU
    sys.exit(f"config error: {error}")
try:
    sampler = build_sampler(cfg, "test", device)
except DataError as error:  # missing or corrupt files
    sys.exit(f"data error: {error}")
except ValueError as error:  # a task shape the split cannot supply
    sys.exit(f"task error: {error}")

learner = build_learner(cfg, dtype, device)
try:
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
    learner, sampler, num_tasks=cfg.eval.tasks, seed=cfg.eval.seed,
    batch_size=cfg.eval.batch_size, inner_steps=test_inner_steps(cfg),
    rule=test_rule, dtype=dtype, device=device, chunk_size=cfg.train.chunk_size, per_task=True,
    transductive=cfg.eval.transductive,
)
results = {"test": test, "checkpoint": str(path), "step": state["step"], **run_metadata(cfg, device),
           "test_wall_time_s": time.perf_counter() - start}
out = path.parent / f"results_{path.stem}.json"
atomic_write_text(out, to_json(results, indent=2))
print(f"test accuracy: {test['accuracy']:.2f} ± {test['ci95']:.2f}% over {test['tasks']} tasks (step {state['step']})")
print(f"results: {out}")
