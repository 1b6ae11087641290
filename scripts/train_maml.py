"""Train and evaluate a meta-learner.

    python scripts/train_maml.py                                   # the default: Omniglot 5w1s, short CPU run
    python scripts/train_maml.py preset=maml_omniglot_5w1s seed=1  # a paper preset
    python scripts/train_maml.py preset=maml_omniglot_20w1s train.iterations=100 driver=loop out_dir=runs/x

Every key of meta/training/config.py can be overridden as key=value: --help lists them all with their types,
defaults, allowed values and meanings, and the presets; --show-config prints the resolved config and exits.
A comma list sweeps: seed=0,1,2 runs one run per value into out_dir/seed=0, ... and prints one summary line.
Outputs in out_dir: config.yaml, metrics.jsonl, checkpoint.pt, best.pt, curves.png, results.json (and with
eval.checkpoint=ensemble the top validation checkpoints top_step*.pt).
Several processes, GPUs or machines: python -m torch.distributed.run --nproc_per_node N scripts/train_maml.py ...
(one run; rank 0 writes every output; see the README's "Scaling out").
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from meta.data import DataError
from meta.data.cache import remove_stale_temporaries
from meta.evaluation import evaluate_learner, records_every_step
from meta.training.builders import (
    build_inner_rule,
    build_learner,
    build_optimizer,
    build_samplers,
    check_test_rule,
    meta_lr_at,
    resolve_device,
    resolve_dtype,
    test_inner_steps,
)
from meta.training.cli_help import DEFAULT_PRESET, info_text
from meta.training.config import ConfigError, check_resume_config, load_config
from meta.training.cuda_graph import GraphedMetaStep
from meta.training.distributed import (
    DistributedMetaStep,
    check_distributable,
    init_distributed,
    one_line_errors,
    rank_device,
    torchrun_world,
)
from meta.training.run_log import (
    CheckpointError,
    MetricsLog,
    atomic_write_text,
    check_out_dir,
    device_name,
    early_stop_start,
    early_stop_update,
    existing_run_files,
    load_checkpoint,
    load_learner_state,
    plot_curves,
    prune_top_checkpoints,
    rank_top,
    remove_run_files,
    run_metadata,
    save_checkpoint,
    to_json,
    top_checkpoint_path,
)
from meta.training.sweep import expand_sweep, summarize_sweep, summary_line, sweep_axes

# ---- configuration and the run folder (nothing is written before the data loads) ------------
info = info_text(__doc__, sys.argv[1:], DEFAULT_PRESET)  # --help, --list-presets: from meta/training/config.py
if info is not None:
    print(info)
    sys.exit(0)
try:
    sweep = sweep_axes(sys.argv[1:])  # seed=0,1,2 and other comma lists
except ValueError as error:
    sys.exit(f"config error: {error}")
if sweep and torchrun_world() > 1:
    sys.exit("config error: a sweep (comma list) starts one run after another; under torchrun launch one run per "
             "command, or run the sweep without torchrun")
if sweep:  # one run per combination, each in a sibling folder (a process of this script), then one summary line
    named = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    runs = expand_sweep(sys.argv[1:], "")
    try:  # every combination's config is checked before the first run starts
        configs = [load_config([a for a in args if not a.startswith("out_dir=")], preset=DEFAULT_PRESET)
                   for _, args in runs]
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    base_out = Path(named.get("out_dir") or f"runs/{configs[0].preset}-sweep")
    failed = []
    for name, args in expand_sweep(sys.argv[1:], str(base_out)):
        print(f"==== sweep run {name} -> {base_out / name}", flush=True)
        if subprocess.run([sys.executable, __file__, *args]).returncode != 0:
            failed.append(name)
    print(summary_line(summarize_sweep(base_out, [name for name, _ in runs])))
    sys.exit(f"sweep: runs failed: {', '.join(failed)}" if failed else 0)
try:
    cfg = load_config([a for a in sys.argv[1:] if a != "--show-config"], preset=DEFAULT_PRESET)
except ConfigError as error:
    sys.exit(f"config error: {error}")
if "--show-config" in sys.argv[1:]:  # the resolved config of this command line; nothing runs
    print(OmegaConf.to_yaml(cfg), end="")
    sys.exit(0)
# ---- torchrun: one run on several processes (meta/training/distributed.py); without it, dist_ctx is one process
try:
    wants_cuda = resolve_device(cfg.device).type == "cuda"
except RuntimeError as error:  # device=cuda without a GPU
    sys.exit(f"config error: {error}")
try:
    dist_ctx = init_distributed(cfg.dist.timeout_s, cuda=wants_cuda)
except (ValueError, RuntimeError) as error:  # a broken torchrun environment, or no rendezvous within the timeout
    sys.exit(f"torchrun error: {error}")
if dist_ctx.world > 1:  # a failed collective (a rank died or hangs) prints its message, not a traceback
    sys.excepthook = one_line_errors()
if not dist_ctx.is_main:  # rank 0 alone prints and writes; errors still go to every rank's stderr
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
# ---- end torchrun ----
out_dir = Path(cfg.out_dir or f"runs/{cfg.preset}-seed{cfg.seed}")
ckpt_path, best_path = out_dir / "checkpoint.pt", out_dir / "best.pt"


def open_run(cfg):
    """Check out_dir and load the checkpoint to resume (rank 0 only): the config, the state (or None), the keys
    changed on resume. Exits with a message on any problem."""
    if cfg.resume and cfg.overwrite:
        sys.exit("config error: resume=true continues the run in out_dir and overwrite=true replaces it; pass one")
    problem = check_out_dir(out_dir)
    if problem:
        sys.exit(f"config error: {problem}")
    if not cfg.resume:
        if existing_run_files(out_dir) and not cfg.overwrite:
            sys.exit(f"{out_dir} already holds a run ({', '.join(existing_run_files(out_dir)[:6])}); pass "
                     f"resume=true to continue it, overwrite=true to replace it, or choose another out_dir")
        return cfg, None, []
    if not ckpt_path.exists():
        sys.exit(f"resume=true, but there is no checkpoint at {ckpt_path}; start the run again with overwrite=true")
    try:
        resumed_state = load_checkpoint(ckpt_path)
        saved_config = resumed_state["config"]
        cfg = load_config(sys.argv[1:], base=saved_config)  # the saved run's config, with the overrides
        return cfg, resumed_state, check_resume_config(saved_config, cfg)
    except (CheckpointError, ConfigError) as error:
        sys.exit(f"resume error: {error}")


opened = None
try:
    opened = open_run(cfg) if dist_ctx.is_main else None
except SystemExit as stop:
    dist_ctx.agree(str(stop.code))  # every rank ends with rank 0's message
dist_ctx.agree(None)
cfg, resumed_state, changed = dist_ctx.broadcast_object(opened)  # other ranks need no access to out_dir
try:
    device, dtype = rank_device(resolve_device(cfg.device), dist_ctx), resolve_dtype(cfg.dtype)
except RuntimeError as error:  # device=cuda without a GPU
    sys.exit(f"config error: {error}")
dist_ctx.agree(check_distributable(cfg, dist_ctx))
if cfg.train.cuda_graph and device.type != "cuda":
    sys.exit(f"config error: train.cuda_graph=true needs a CUDA device, and device={cfg.device} resolved to {device}")
processes = f" | {dist_ctx.world} processes ({dist_ctx.backend})" if dist_ctx.world > 1 else ""
print(f"preset {cfg.preset} | device {device_name(device)} | dtype {cfg.dtype} | driver {cfg.driver}{processes}")

# ---- data, model, optimizer -----------------------------------------------------------------
problem = None
try:  # before anything is written: a run that cannot start leaves no folder behind
    samplers = build_samplers(cfg, device)
except DataError as error:  # missing or corrupt files, an unwritable cache folder
    problem = f"data error: {error}"
except ValueError as error:  # a task shape the split cannot supply
    problem = f"task error: {error}"
dist_ctx.agree(problem)  # a failure on any rank ends every rank, with its message
learner = build_learner(cfg, dtype, device)
test_rule = build_inner_rule(cfg, test=True)
try:
    check_test_rule(cfg, learner, test_rule)
except ValueError as error:  # an inner.test_lr that would change nothing
    sys.exit(f"config error: {error}")
try:
    # every rank checks the package (the same result everywhere); only rank 0 ever appends, and so writes
    metrics = MetricsLog(out_dir / "metrics.jsonl", tensorboard=cfg.log.tensorboard)  # writes nothing yet
except ConfigError as error:  # log.tensorboard=true without the tensorboard package
    sys.exit(f"config error: {error}")
try:
    if dist_ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist_ctx.agree(None)
except OSError as error:
    dist_ctx.agree(f"config error: cannot create out_dir {out_dir} ({error.strerror}); choose another out_dir")
for stale in remove_stale_temporaries(out_dir) if dist_ctx.is_main else []:  # left by a kill during a save
    print(f"removed {stale.name}, left by an interrupted save")
if cfg.overwrite and not cfg.resume and dist_ctx.is_main:
    removed = remove_run_files(out_dir)
    if removed:
        print(f"overwrite=true: removed the previous run's {', '.join(removed)}")
print(f"writing to {out_dir.resolve()}")
test_steps = test_inner_steps(cfg)
optimizer = build_optimizer(cfg, learner)
meta_lrs = [meta_lr_at(cfg, s) for s in range(cfg.train.iterations)]  # per iteration (train.lr_schedule)
generator = torch.Generator().manual_seed(cfg.seed)  # the only source of training tasks
step, best, window = 0, {"accuracy": -1.0, "step": 0}, {"loss": 0.0, "accuracy": 0.0, "count": 0}
top: list[dict] = []  # eval.checkpoint=ensemble: the eval.ensemble_size best validations, best first
train_seconds = 0.0
early_stop = early_stop_start()  # train.early_stop_patience: the best validation loss, its step, the wait

if resumed_state is not None:
    state = resumed_state
    try:
        load_learner_state(learner, state, ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, best, window, train_seconds = state["step"], state["best"], state["window"], state["train_seconds"]
        top = state.get("top", [])
        early_stop = state.get("early_stop", early_stop)  # (absent from checkpoints written before the key)
        if dist_ctx.is_main:
            metrics.truncate_after(step)  # also drops a half-written last line
            prune_top_checkpoints(out_dir, top)  # top files written after the checkpoint: those steps run again
    except (CheckpointError, KeyError, ValueError, RuntimeError) as error:
        sys.exit(f"resume error: {ckpt_path}: {' '.join(str(error).split())[:300]}")
    learner.auto_driver.choices.update(state["auto_choices"])  # the same strategy as before the interruption
    note = f" (changed on resume: {', '.join(changed)})" if changed else ""
    print(f"resumed from step {step}{note}")
elif dist_ctx.is_main:
    metrics.path.unlink(missing_ok=True)
if dist_ctx.is_main:
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg))
dist_ctx.broadcast_(learner.parameters())  # every rank starts from rank 0's weights
last_saved = step  # the step of the newest checkpoint: a run that diverges keeps it


def checkpoint() -> None:
    global last_saved
    check_finite()
    last_saved = step
    if not dist_ctx.is_main:
        return
    save_checkpoint(ckpt_path, {
        "config": OmegaConf.to_container(cfg), "learner": learner.state_dict(), "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(), "step": step, "best": best,
        "window": {"loss": float(window["loss"]), "accuracy": float(window["accuracy"]), "count": window["count"]},
        "train_seconds": train_seconds, "auto_choices": learner.auto_driver.choices, "top": top,
        "early_stop": early_stop,
    })
    prune_top_checkpoints(out_dir, top)  # only now: until it is saved, a resume goes back to the files it lists


def check_finite() -> None:
    """Stop (exit code 1) if any step so far had a non-finite meta-loss or left non-finite weights (a non-finite
    meta-gradient or update). Synchronizes only here, at log, validation and checkpoint steps."""
    if math.isfinite(float(first_bad_step)):
        bar.close()
        sys.exit(f"training diverged: the meta-loss or the meta-gradient became non-finite (NaN or inf) at step "
                 f"{int(first_bad_step)}. Nothing after step {last_saved} was saved; {ckpt_path} holds the last "
                 f"finite state. The likely knob: inner.lr={cfg.inner.lr} or train.meta_lr={cfg.train.meta_lr} is "
                 f"too large; lower it and start again in a new out_dir (or with overwrite=true)")


def evaluate(split: str, num_tasks: int, seed: int, model=None) -> dict:
    """``model`` (default: the learner being trained) on the fixed task set of ``split``; a list: its ensemble."""
    return evaluate_learner(
        learner if model is None else model, samplers[split], num_tasks=num_tasks, seed=seed,
        batch_size=cfg.eval.batch_size,
        inner_steps=test_steps, rule=test_rule, dtype=dtype, device=device, chunk_size=cfg.train.chunk_size,
        per_task=split == "test",  # results.json keeps each test task's accuracy (paired comparisons)
        per_step=split == "test" and records_every_step(learner if model is None else model, cfg.eval.transductive),
        dist=dist_ctx,  # several processes: each evaluates its share of the batches, gathered in task order
        transductive=cfg.eval.transductive,
    )


# ---- training -------------------------------------------------------------------------------
bar = tqdm(total=cfg.train.iterations, initial=step, disable=not (cfg.progress and dist_ctx.is_main),
           dynamic_ncols=True)
tick = time.perf_counter()


def request_stop(signum, frame) -> None:  # Ctrl-C: finish this step, save a checkpoint, exit
    signals_seen.append(signum)
    if dist_ctx.world == 1:  # (torchrun passes the terminal's Ctrl-C on as a second SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


def meta_step(tasks: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step: the meta-gradient of a batch of tasks, then the outer optimizer's step."""
    result = learner.train_step(optimizer, tasks, driver=cfg.driver, chunk_size=cfg.train.chunk_size)
    return result.loss, result.accuracy


if cfg.train.cuda_graph:  # the same step, replayed as a captured CUDA graph
    try:
        meta_step = GraphedMetaStep(learner, optimizer, driver=cfg.driver, chunk_size=cfg.train.chunk_size)
    except ValueError as error:
        sys.exit(f"config error: train.cuda_graph=true: {error}")
signals_seen: list[int] = []  # signals this process received
stop_requested = signals_seen  # one process stops when it receives one
if dist_ctx.world > 1:  # several: each rank's share, gradients summed across ranks; all stop after the same step
    meta_step = DistributedMetaStep(learner, optimizer, dist_ctx, driver=cfg.driver, chunk_size=cfg.train.chunk_size,
                                    signals=signals_seen)
    stop_requested = meta_step.stop_agreed

first_bad_step = torch.tensor(math.inf, device=device)  # the first step with a non-finite loss or weights
if resumed_state is None:  # a step-0 checkpoint: a run stopped at any point from here on can be resumed
    checkpoint()
signal.signal(signal.SIGINT, request_stop)
while step < cfg.train.iterations and not stop_requested and not early_stop["stopped"]:
    for group in optimizer.param_groups:  # the meta learning rate of this step (train.lr_schedule)
        if torch.is_tensor(group["lr"]):  # train.cuda_graph: the captured step reads this tensor, set it in place
            group["lr"].fill_(meta_lrs[step])
        else:
            group["lr"] = meta_lrs[step]
    learner.set_iteration(step, cfg.train.iterations)  # the learner's schedule (MAML++'s phases; none for MAML)
    batch = samplers["train"].sample(cfg.train.meta_batch, generator, first_task=step * cfg.train.meta_batch)
    loss, accuracy = meta_step((batch.support_x.to(dtype), batch.support_y, batch.query_x.to(dtype), batch.query_y))
    if cfg.driver == "auto" and step == 0 and learner.auto_driver.choices:
        bar.write(f"driver auto chose: {', '.join(learner.auto_driver.choices.values())}")
    step += 1
    weights_finite = torch.stack([torch.isfinite(p).all() for p in learner.parameters()]).all()
    finite = torch.isfinite(loss).all() & weights_finite  # tensors: no synchronization in every step
    first_bad_step = torch.minimum(first_bad_step, torch.where(finite, math.inf, float(step)))
    # sums stay on the device between log lines: no synchronization in every step
    window = {"loss": window["loss"] + loss.mean().double(),
              "accuracy": window["accuracy"] + accuracy.mean().double() * 100, "count": window["count"] + 1}
    bar.update(1)

    if step % cfg.train.log_every == 0 or step == cfg.train.iterations:
        check_finite()
        now = time.perf_counter()
        train_seconds += now - tick
        record = {"step": step, "split": "train", "loss": float(window["loss"]) / window["count"],
                  "accuracy": float(window["accuracy"]) / window["count"],
                  "its_per_s": window["count"] / max(now - tick, 1e-9)}
        if dist_ctx.is_main:
            metrics.append(record, learning_rate=float(optimizer.param_groups[0]["lr"]))
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.1f}%")
        window = {"loss": 0.0, "accuracy": 0.0, "count": 0}
        tick = time.perf_counter()

    if step % cfg.train.val_every == 0 or step == cfg.train.iterations:
        check_finite()
        val = evaluate("val", cfg.train.val_tasks, seed=cfg.eval.seed + 1)
        if dist_ctx.is_main:
            metrics.append({"step": step, "split": "val", **val})
        if not math.isfinite(val["loss"]):  # the weights are finite, but test-time adaptation diverges
            bar.write(f"warning: step {step}: the validation loss is not finite (logged as null): the test-time "
                      f"inner loop diverges; inner.test_lr or inner.lr is likely too large")
        saved = {"config": OmegaConf.to_container(cfg), "learner": learner.state_dict(), "step": step, "val": val}
        if val["accuracy"] > best["accuracy"]:
            best = {"accuracy": val["accuracy"], "step": step}
            if dist_ctx.is_main:
                save_checkpoint(best_path, saved)
        if cfg.eval.checkpoint == "ensemble":  # files of steps that drop out go at the next checkpoint
            top = rank_top(top, step, val["accuracy"], cfg.eval.ensemble_size)
            if dist_ctx.is_main and any(e["step"] == step for e in top):
                save_checkpoint(top_checkpoint_path(out_dir, step), saved)
        bar.write(f"step {step}: val accuracy {val['accuracy']:.2f} ± {val['ci95']:.2f}% "
                  f"(best {best['accuracy']:.2f})")
        if cfg.train.early_stop_patience is not None:
            early_stop = early_stop_update(early_stop, val["loss"], step, cfg.train.early_stop_patience)
            if early_stop["stopped"]:
                bar.write(f"early stop at step {step}: no lower validation loss than {early_stop['best_loss']:.6f} "
                          f"(step {early_stop['best_step']}) for {early_stop['wait']} validations")
        tick = time.perf_counter()

    if step % cfg.train.checkpoint_every == 0 or step == cfg.train.iterations or early_stop["stopped"]:
        checkpoint()
if stop_requested:
    checkpoint()
    bar.close()
    sys.exit(f"\ninterrupted: checkpoint saved at step {step}; continue with the same command plus resume=true")
bar.close()

# ---- test -----------------------------------------------------------------------------------
tested = learner
if cfg.eval.checkpoint == "ensemble":  # MAML++ (experiment_builder.py L247-290): the top validation checkpoints
    tested = [build_learner(cfg, dtype, device) for _ in top]
    for member, entry in zip(tested, top):
        if dist_ctx.is_main:
            path = top_checkpoint_path(out_dir, entry["step"])
            load_learner_state(member, load_checkpoint(path, map_location=device), path)
        dist_ctx.broadcast_([*member.parameters(), *member.buffers()])
    fewer = (f"; only {len(top)} validations ran, eval.ensemble_size={cfg.eval.ensemble_size}"
             if len(top) < cfg.eval.ensemble_size else "")
    chosen = (f"ensemble of the top {len(top)} validation checkpoints (steps "
              f"{', '.join(str(e['step']) for e in top)}{fewer})")
elif cfg.eval.checkpoint == "best" and dist_ctx.broadcast_object(best_path.exists()):  # rank 0's folder
    if dist_ctx.is_main:
        learner.load_state_dict(load_checkpoint(best_path, map_location=device)["learner"])
    dist_ctx.broadcast_([*learner.parameters(), *learner.buffers()])
    chosen = f"best validation (step {best['step']})"
else:
    chosen = f"last (step {step})"
start = time.perf_counter()
test = evaluate("test", cfg.eval.tasks, seed=cfg.eval.seed, model=tested)
dist_ctx.close()
if not dist_ctx.is_main:
    sys.exit(0)
results = {
    "test": test, "checkpoint": chosen, "best_val": best, **run_metadata(cfg, device),
    **({"ensemble": top} if cfg.eval.checkpoint == "ensemble" else {}),  # steps and validation accuracies
    "train_wall_time_s": train_seconds, "test_wall_time_s": time.perf_counter() - start,
    "command": " ".join(["python", *sys.argv]), "processes": dist_ctx.world,
}
if cfg.train.early_stop_patience is not None:  # the best validation loss and its step (the retraining's length)
    results["early_stop"] = {**early_stop, "patience": cfg.train.early_stop_patience, "steps_trained": step}
atomic_write_text(out_dir / "results.json", to_json(results, indent=2))
metrics.close()
plot_curves(metrics.read(), out_dir / "curves.png", title=f"{cfg.preset} (seed {cfg.seed})",
            test={**test, "step": step}, reference=OmegaConf.to_container(cfg.reference))
ref = cfg.reference
ci = f" ± {ref.ci95}" if ref.ci95 is not None else ""  # some papers give no interval
paper = f" | paper: {ref.accuracy}{ci}% ({ref.source})" if ref.accuracy is not None else ""
print(f"test accuracy ({chosen}): {test['accuracy']:.2f} ± {test['ci95']:.2f}% over {test['tasks']} tasks{paper}")
if "steps" in test:  # cbfinn/maml's test() prints every step's column
    columns = ", ".join(f"{s['step']}: {s['accuracy']:.2f}" for s in test["steps"])
    print(f"test accuracy after each inner step: {columns}")
print(f"results: {(out_dir / 'results.json').resolve()}  curves: {(out_dir / 'curves.png').resolve()}")
