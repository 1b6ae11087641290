"""Training and evaluation as functions: :func:`train` runs one run (what ``meta-train`` runs), :func:`evaluate`
tests a saved one (``meta-evaluate``); :func:`meta.experiments.sweep.train_sweep` runs a comma-list sweep of them.

    import meta
    cfg = meta.load_config("maml_omniglot_5w1s", ["train.iterations=100", "out_dir=runs/try"])
    result = meta.train(cfg)        # opens (or resumes) runs/try, trains, validates, checkpoints, tests
    result.test["accuracy"], result.out_dir, result.learner

A run that cannot start or go on raises :class:`~meta.training.errors.RunError`, whose message is the one line the
command line prints. Under ``torchrun`` every rank calls :func:`train`; rank 0 alone prints and writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from meta.data import DataError
from meta.data.cache import remove_stale_temporaries
from meta.evaluation import evaluate_learner, records_every_step
from meta.learner import MetaLearner, Tasks
from meta.training import config as config_module
from meta.training.builders import (
    build_inner_rule,
    build_learner,
    build_optimizer,
    build_sampler,
    build_samplers,
    check_test_rule,
    meta_lr_at,
    resolve_device,
    resolve_dtype,
    test_inner_steps,
    tf32_allowed,
)
from meta.training.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_learner_state,
    prune_top_checkpoints,
    rank_top,
    save_checkpoint,
    top_checkpoint_path,
)
from meta.training.cli_help import DEFAULT_PRESET  # the preset of a command line that names none
from meta.training.config import ConfigError, check_eval_overrides, check_resume_config
from meta.training.cuda_graph import GraphedMetaStep
from meta.training.distributed import (
    DistContext,
    DistributedMetaStep,
    check_distributable,
    init_distributed,
    rank_device,
)
from meta.training.early_stopping import early_stop_start, early_stop_update
from meta.training.errors import RunError, RunInterrupted
from meta.training.lock import run_folder_lock
from meta.training.metrics_log import MetricsLog, to_json
from meta.training.plots import plot_curves
from meta.training.run_folder import atomic_write_text, check_out_dir, existing_run_files, remove_run_files
from meta.training.run_metadata import device_name, run_metadata


def load_config(preset: str | None = DEFAULT_PRESET, overrides: Sequence[str] = ()) -> DictConfig:
    """The config of a run: ``preset`` (a name in ``configs/``; default the short Omniglot run) with ``key=value``
    ``overrides``, validated. ``load_config("maml_omniglot_5w1s", ["train.iterations=100"])`` is the config of
    ``meta-train preset=maml_omniglot_5w1s train.iterations=100``. Raises ``ConfigError`` naming the bad key."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of key=value strings, not the string {overrides!r}")
    return config_module.load_config(list(overrides), preset=preset)


def run_folder(cfg: DictConfig) -> Path:
    """Where a run writes: ``out_dir``, else ``runs/<preset>-seed<seed>``."""
    return Path(cfg.out_dir or f"runs/{cfg.preset}-seed{cfg.seed}")


@dataclass
class RunResult:
    """What :func:`train` returns: the run folder, the test record and every field of ``results.json``.

    ``learner`` holds the weights that were tested (with ``eval.checkpoint=best``, the best validation's; with
    ``ensemble``, the last ones, the members being in ``top_step*.pt``). On ranks other than 0 of a torchrun job,
    ``results`` is empty (rank 0 alone writes it) while ``test`` holds the same numbers."""

    out_dir: Path
    test: dict[str, Any]
    checkpoint: str
    step: int
    best_val: dict[str, Any]
    learner: MetaLearner
    results: dict[str, Any] = field(default_factory=dict)


# ---- the meta-step: the one place where plain, CUDA-graphed or distributed is chosen ------------------------------
class PlainMetaStep:
    """``step(tasks) -> (loss, accuracy)`` per task: the meta-gradient of a batch of tasks, then the outer
    optimizer's step (``learner.train_step``)."""

    def __init__(self, learner: MetaLearner, optimizer: torch.optim.Optimizer, driver: str,
                 chunk_size: int | None) -> None:
        self.learner, self.optimizer, self.driver, self.chunk_size = learner, optimizer, driver, chunk_size

    def __call__(self, tasks: Tasks) -> tuple[torch.Tensor, torch.Tensor]:
        result = self.learner.train_step(self.optimizer, tasks, driver=self.driver, chunk_size=self.chunk_size)
        return result.loss, result.accuracy


def choose_meta_step(
    cfg: DictConfig, learner: MetaLearner, optimizer: torch.optim.Optimizer, dist_ctx: DistContext,
    signals: list[int],
) -> tuple[Callable[[Tasks], tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """The training step of this run and the list that is non-empty once training must stop.

    Several processes (torchrun): :class:`DistributedMetaStep`, each rank's share with gradients summed across
    ranks, stopping when any rank received a signal (after the same step on all). ``train.cuda_graph``:
    :class:`GraphedMetaStep`, the plain step replayed as a captured CUDA graph. Otherwise :class:`PlainMetaStep`.
    ``signals`` is the list this process's signal handler appends to."""
    if dist_ctx.world > 1:
        step = DistributedMetaStep(learner, optimizer, dist_ctx, driver=cfg.driver, chunk_size=cfg.train.chunk_size,
                                   signals=signals)
        return step, step.stop_agreed
    if cfg.train.cuda_graph:
        try:
            return GraphedMetaStep(learner, optimizer, driver=cfg.driver, chunk_size=cfg.train.chunk_size), signals
        except ValueError as error:
            raise RunError(f"config error: train.cuda_graph=true: {error}") from None
    return PlainMetaStep(learner, optimizer, driver=cfg.driver, chunk_size=cfg.train.chunk_size), signals


def set_meta_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (``train.lr_schedule``): in place when it is a tensor, as a CUDA
    graph's captured step reads it from that tensor (``train.cuda_graph``)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


#: the signals that stop training after the current step with a checkpoint (Ctrl-C, a scheduler's SIGTERM,
#: a closed terminal's SIGHUP)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def stop_on_signals(signals: list[int], second_stops_at_once: bool) -> Iterator[None]:
    """While inside, each of :data:`STOP_SIGNALS` appends its number to ``signals`` instead of ending the process;
    with ``second_stops_at_once`` a second one of the same kind then acts as it normally does (a second Ctrl-C
    raises ``KeyboardInterrupt``). The previous handlers come back on exit. Outside the main thread (where Python
    delivers signals) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        signals.append(signum)
        if second_stops_at_once:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    for number in STOP_SIGNALS:
        signal.signal(number, request_stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# ---- opening the run folder ----------------------------------------------------------------------------------------
def already_holds_a_run(out_dir: Path) -> str:
    """The refusal of a new run in a folder that holds files of another one."""
    return (f"{out_dir} already holds a run ({', '.join(existing_run_files(out_dir)[:6])}); pass resume=true to "
            f"continue it, overwrite=true to replace it, or choose another out_dir")


def open_run(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] | None) -> tuple[DictConfig, Any, list[str]]:
    """Check ``out_dir`` and load the checkpoint to resume: the config, the saved state (or None), the keys changed
    on resume. On resume the config is the saved one with ``overrides`` (the command line's way), or, when
    ``overrides`` is None, ``cfg`` itself, which may differ from the saved config only in resume-safe keys.
    Raises :class:`RunError` on any problem."""
    if cfg.resume and cfg.overwrite:
        raise RunError("config error: resume=true continues the run in out_dir and overwrite=true replaces it; "
                       "pass one")
    problem = check_out_dir(out_dir)
    if problem:
        raise RunError(f"config error: {problem}")
    if not cfg.resume:
        if existing_run_files(out_dir) and not cfg.overwrite:
            raise RunError(already_holds_a_run(out_dir))
        return cfg, None, []
    ckpt_path = out_dir / "checkpoint.pt"
    if not ckpt_path.exists():
        raise RunError(f"resume=true, but there is no checkpoint at {ckpt_path}; start the run again with "
                       f"overwrite=true")
    try:
        resumed_state = load_checkpoint(ckpt_path)
        saved_config = resumed_state["config"]
        if overrides is not None:  # the saved run's config, with the overrides
            cfg = config_module.load_config(list(overrides), base=saved_config)
        return cfg, resumed_state, check_resume_config(saved_config, cfg)
    except (CheckpointError, ConfigError) as error:
        raise RunError(f"resume error: {error}") from None


# ---- one run ----------------------------------------------------------------------------------------------------
def train(config: DictConfig, *, overrides: Sequence[str] | None = None, command: str | None = None) -> RunResult:
    """Run ``config`` as ``meta-train`` does: open (or, with ``resume=true``, continue) the run in ``out_dir``,
    train with validation, checkpoints and early stopping, test, and write ``results.json`` and ``curves.png``.

    ``overrides``: the ``key=value`` list ``config`` was built from; on resume it is applied to the saved config
    (as the command line does). ``command``: what ``results.json`` records as the command (default: a note that
    the run came from Python). Ctrl-C, SIGTERM and SIGHUP finish the current step, save a checkpoint and raise
    :class:`RunInterrupted`; any other problem raises :class:`RunError` with its one-line message."""
    try:
        wants_cuda = resolve_device(config.device).type == "cuda"
    except RuntimeError as error:  # device=cuda without a GPU
        raise RunError(f"config error: {error}") from None
    try:  # torchrun: one run on several processes (meta/training/distributed.py); without it, one process
        dist_ctx = init_distributed(config.dist.timeout_s, cuda=wants_cuda)
    except (ValueError, RuntimeError) as error:  # a broken torchrun environment, or no rendezvous in time
        raise RunError(f"torchrun error: {error}") from None
    with contextlib.ExitStack() as stack:
        if not dist_ctx.is_main:  # rank 0 alone prints and writes; errors still reach every rank's caller
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        return _Run(config, dist_ctx, overrides, command).run()


class _Run:
    """The state of one run while :func:`train` runs it; its methods are the steps of the training script."""

    def __init__(self, config: DictConfig, dist_ctx: DistContext, overrides: Sequence[str] | None,
                 command: str | None) -> None:
        self.config, self.overrides, self.dist_ctx = config, overrides, dist_ctx
        self.out_dir = run_folder(config)
        self.ckpt_path, self.best_path = self.out_dir / "checkpoint.pt", self.out_dir / "best.pt"
        self.command = command if command is not None else "meta.train (from Python; the config: config.yaml)"
        self.locked = False  # whether this process holds out_dir's lock (rank 0 only)

    def run(self) -> RunResult:
        """Open the run folder (holding its lock until the end), set up, train, test: the whole run."""
        with contextlib.ExitStack() as self.held:
            self.cfg, self.resumed_state, self.changed = self._open()
            self._set_up()
            self._restore_or_start()
            signals: list[int] = []  # the signals this process received
            meta_step, stop_requested = choose_meta_step(self.cfg, self.learner, self.optimizer, self.dist_ctx,
                                                         signals)
            self.first_bad_step = torch.tensor(math.inf, device=self.device)  # the first non-finite step
            self.bar = tqdm(total=self.cfg.train.iterations, initial=self.step,
                            disable=not (self.cfg.progress and self.dist_ctx.is_main), dynamic_ncols=True)
            if self.resumed_state is None:  # a step-0 checkpoint: a run stopped from here on can be resumed
                self.checkpoint()
            # (torchrun passes the terminal's Ctrl-C on as a second SIGINT: under it, every signal only asks to stop)
            with stop_on_signals(signals, second_stops_at_once=self.dist_ctx.world == 1):
                self._train(meta_step, stop_requested)
                if stop_requested:
                    self.checkpoint()
                    self.bar.close()
                    name = signal.Signals(signals[0]).name if signals else "a signal on another rank"
                    detail = "" if signals and signals[0] == signal.SIGINT else f" ({name})"
                    raise RunInterrupted(f"\ninterrupted{detail}: checkpoint saved at step {self.step}; continue "
                                         f"with the same command plus resume=true", self.step,
                                         signals[0] if signals else 0)
                self.bar.close()
                return self._test()

    def _open(self) -> tuple[DictConfig, Any, list[str]]:
        """:func:`open_run` on rank 0 (after taking the lock of an existing out_dir, so that no other process
        reads or writes it meanwhile), its result (or its error) on every rank."""
        opened, problem = None, None
        if self.dist_ctx.is_main:
            try:
                if self.out_dir.is_dir():
                    self._lock()
                opened = open_run(self.config, self.out_dir, self.overrides)
            except RunError as error:
                problem = str(error)
        self.dist_ctx.agree(problem)  # every rank ends with rank 0's message
        return self.dist_ctx.broadcast_object(opened)  # other ranks need no access to out_dir

    def _lock(self) -> None:
        """Hold out_dir's lock until the run ends (:func:`run_folder_lock`); a RunError if another process has it."""
        self.held.enter_context(run_folder_lock(self.out_dir))
        self.locked = True

    # ---- set-up: data, model, optimizer (nothing is written before the data loads) ---------------------------
    def _set_up(self) -> None:
        cfg, dist_ctx = self.cfg, self.dist_ctx
        try:
            self.device, self.dtype = rank_device(resolve_device(cfg.device), dist_ctx), resolve_dtype(cfg.dtype)
        except RuntimeError as error:  # device=cuda without a GPU
            raise RunError(f"config error: {error}") from None
        dist_ctx.agree(check_distributable(cfg, dist_ctx))
        if cfg.train.cuda_graph and self.device.type != "cuda":
            raise RunError(f"config error: train.cuda_graph=true needs a CUDA device, and device={cfg.device} "
                           f"resolved to {self.device}")
        self.held.enter_context(tf32_allowed(cfg.tf32))  # restored when the run ends
        processes = f" | {dist_ctx.world} processes ({dist_ctx.backend})" if dist_ctx.world > 1 else ""
        tf32 = f" | tf32 {'on' if cfg.tf32 else 'off'}" if self.device.type == "cuda" else ""
        print(f"preset {cfg.preset} | device {device_name(self.device)} | dtype {cfg.dtype}{tf32} | driver "
              f"{cfg.driver}{processes}")
        problem = None
        try:  # before anything is written: a run that cannot start leaves no folder behind
            self.samplers = build_samplers(cfg, self.device)
        except DataError as error:  # missing or corrupt files, an unwritable cache folder
            problem = f"data error: {error}"
        except ValueError as error:  # a task shape the split cannot supply
            problem = f"task error: {error}"
        dist_ctx.agree(problem)  # a failure on any rank ends every rank, with its message
        self.learner = build_learner(cfg, self.dtype, self.device)
        self.test_rule = build_inner_rule(cfg, test=True)
        try:
            check_test_rule(cfg, self.learner, self.test_rule)
        except ValueError as error:  # an inner.test_lr that would change nothing
            raise RunError(f"config error: {error}") from None
        try:
            # every rank checks the package (the same result everywhere); only rank 0 ever appends, and so writes
            self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", tensorboard=cfg.log.tensorboard)
        except ConfigError as error:  # log.tensorboard=true without the tensorboard package
            raise RunError(f"config error: {error}") from None
        problem = None
        if dist_ctx.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                if not self.locked:  # a new folder: locked now; another process may have started in it meanwhile
                    self._lock()
                    if not cfg.resume and not cfg.overwrite and existing_run_files(self.out_dir):
                        raise RunError(already_holds_a_run(self.out_dir))
            except OSError as error:
                problem = (f"config error: cannot create out_dir {self.out_dir} ({error.strerror}); choose another "
                           f"out_dir")
            except RunError as error:
                problem = str(error)
        dist_ctx.agree(problem)
        for stale in remove_stale_temporaries(self.out_dir) if dist_ctx.is_main else []:  # a kill during a save
            print(f"removed {stale.name}, left by an interrupted save")
        if cfg.overwrite and not cfg.resume and dist_ctx.is_main:
            removed = remove_run_files(self.out_dir)
            if removed:
                print(f"overwrite=true: removed the previous run's {', '.join(removed)}")
        print(f"writing to {self.out_dir.resolve()}")
        self.test_steps = test_inner_steps(cfg)
        self.optimizer = build_optimizer(cfg, self.learner)
        self.meta_lrs = [meta_lr_at(cfg, s) for s in range(cfg.train.iterations)]  # per iteration
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the only source of training tasks

    def _restore_or_start(self) -> None:
        """The training state: a fresh one, or the checkpoint's when resuming (with the log cut back to it)."""
        cfg, dist_ctx = self.cfg, self.dist_ctx
        self.step, self.best = 0, {"accuracy": -1.0, "step": 0}
        self.window: dict[str, Any] = {"loss": 0.0, "accuracy": 0.0, "count": 0}
        self.top: list[dict] = []  # eval.checkpoint=ensemble: the eval.ensemble_size best validations, best first
        self.train_seconds = 0.0
        self.early_stop = early_stop_start()  # train.early_stop_patience: the best validation loss, its step, wait
        state = self.resumed_state
        if state is not None:
            try:
                load_learner_state(self.learner, state, self.ckpt_path)
                self.optimizer.load_state_dict(state["optimizer"])
                self.generator.set_state(state["generator"])
                self.step, self.best, self.window = state["step"], state["best"], state["window"]
                self.train_seconds = state["train_seconds"]
                self.top = state.get("top", [])
                self.early_stop = state.get("early_stop", self.early_stop)  # (absent before the key existed)
                if dist_ctx.is_main:
                    self.metrics.truncate_after(self.step)  # also drops a half-written last line
                    prune_top_checkpoints(self.out_dir, self.top)  # top files after the checkpoint: run again
            except (CheckpointError, KeyError, ValueError, RuntimeError) as error:
                raise RunError(f"resume error: {self.ckpt_path}: {' '.join(str(error).split())[:300]}") from None
            self.learner.auto_driver.choices.update(state["auto_choices"])  # the strategy chosen before
            note = f" (changed on resume: {', '.join(self.changed)})" if self.changed else ""
            print(f"resumed from step {self.step}{note}")
        elif dist_ctx.is_main:
            self.metrics.path.unlink(missing_ok=True)
        if dist_ctx.is_main:
            atomic_write_text(self.out_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        dist_ctx.broadcast_(self.learner.parameters())  # every rank starts from rank 0's weights
        self.last_saved = self.step  # the step of the newest checkpoint: a run that diverges keeps it

    # ---- checkpoints, divergence, validation -------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Save the whole training state to checkpoint.pt (rank 0), after checking that it is finite."""
        self.check_finite()
        self.last_saved = self.step
        if not self.dist_ctx.is_main:
            return
        window = self.window
        save_checkpoint(self.ckpt_path, {
            "config": OmegaConf.to_container(self.cfg), "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(), "step": self.step,
            "best": self.best,
            "window": {"loss": float(window["loss"]), "accuracy": float(window["accuracy"]), "count": window["count"]},
            "train_seconds": self.train_seconds, "auto_choices": self.learner.auto_driver.choices, "top": self.top,
            "early_stop": self.early_stop,
        })
        prune_top_checkpoints(self.out_dir, self.top)  # only now: until it is saved, a resume needs the files listed

    def check_finite(self) -> None:
        """Stop (:class:`RunError`) if any step so far had a non-finite meta-loss or left non-finite weights (a
        non-finite meta-gradient or update). Synchronizes only here, at log, validation and checkpoint steps."""
        if math.isfinite(float(self.first_bad_step)):
            self.bar.close()
            cfg = self.cfg
            raise RunError(f"training diverged: the meta-loss or the meta-gradient became non-finite (NaN or inf) at "
                           f"step {int(self.first_bad_step)}. Nothing after step {self.last_saved} was saved; "
                           f"{self.ckpt_path} holds the last finite state. The likely knob: inner.lr={cfg.inner.lr} "
                           f"or train.meta_lr={cfg.train.meta_lr} is too large; lower it and start again in a new "
                           f"out_dir (or with overwrite=true)")

    def evaluate(self, split: str, num_tasks: int, seed: int, model: Any = None) -> dict:
        """``model`` (default: the learner being trained) on the fixed task set of ``split``; a list: its ensemble."""
        model = self.learner if model is None else model
        return evaluate_learner(
            model, self.samplers[split], num_tasks=num_tasks, seed=seed, batch_size=self.cfg.eval.batch_size,
            inner_steps=self.test_steps, rule=self.test_rule, dtype=self.dtype, device=self.device,
            chunk_size=self.cfg.train.chunk_size,
            per_task=split == "test",  # results.json keeps each test task's accuracy (paired comparisons)
            per_step=split == "test" and records_every_step(model, self.cfg.eval.transductive),
            dist=self.dist_ctx,  # several processes: each evaluates its share of the batches, gathered in order
            transductive=self.cfg.eval.transductive,
        )

    def _validate(self) -> None:
        """Validate at this step: log it, keep best.pt (and the top checkpoints), update early stopping."""
        cfg, step, bar = self.cfg, self.step, self.bar
        self.check_finite()
        val = self.evaluate("val", cfg.train.val_tasks, seed=cfg.eval.seed + 1)
        if self.dist_ctx.is_main:
            self.metrics.append({"step": step, "split": "val", **val})
        if not math.isfinite(val["loss"]):  # the weights are finite, but test-time adaptation diverges
            bar.write(f"warning: step {step}: the validation loss is not finite (logged as null): the test-time "
                      f"inner loop diverges; inner.test_lr or inner.lr is likely too large")
        saved = {"config": OmegaConf.to_container(cfg), "learner": self.learner.state_dict(), "step": step,
                 "val": val}
        if val["accuracy"] > self.best["accuracy"]:
            self.best = {"accuracy": val["accuracy"], "step": step}
            if self.dist_ctx.is_main:
                save_checkpoint(self.best_path, saved)
        if cfg.eval.checkpoint == "ensemble":  # files of steps that drop out go at the next checkpoint
            self.top = rank_top(self.top, step, val["accuracy"], cfg.eval.ensemble_size)
            if self.dist_ctx.is_main and any(e["step"] == step for e in self.top):
                save_checkpoint(top_checkpoint_path(self.out_dir, step), saved)
        bar.write(f"step {step}: val accuracy {val['accuracy']:.2f} ± {val['ci95']:.2f}% "
                  f"(best {self.best['accuracy']:.2f})")
        if cfg.train.early_stop_patience is not None:
            self.early_stop = early_stop_update(self.early_stop, val["loss"], step, cfg.train.early_stop_patience)
            if self.early_stop["stopped"]:
                stop = self.early_stop
                bar.write(f"early stop at step {step}: no lower validation loss than {stop['best_loss']:.6f} "
                          f"(step {stop['best_step']}) for {stop['wait']} validations")

    # ---- training ------------------------------------------------------------------------------------------------
    def _train(self, meta_step: Callable[[Tasks], tuple[torch.Tensor, torch.Tensor]],
               stop_requested: list[int]) -> None:
        """Meta-steps until ``train.iterations``, early stopping or a stop request; log, validate and checkpoint."""
        cfg, learner, bar = self.cfg, self.learner, self.bar
        tick = time.perf_counter()
        while self.step < cfg.train.iterations and not stop_requested and not self.early_stop["stopped"]:
            set_meta_lr(self.optimizer, self.meta_lrs[self.step])  # the meta learning rate of this step
            learner.set_iteration(self.step, cfg.train.iterations)  # the learner's schedule (MAML++'s phases)
            batch = self.samplers["train"].sample(cfg.train.meta_batch, self.generator,
                                                  first_task=self.step * cfg.train.meta_batch)
            loss, accuracy = meta_step((batch.support_x.to(self.dtype), batch.support_y,
                                        batch.query_x.to(self.dtype), batch.query_y))
            if cfg.driver == "auto" and self.step == 0 and learner.auto_driver.choices:
                bar.write(f"driver auto chose: {', '.join(learner.auto_driver.choices.values())}")
            self.step += 1
            step = self.step
            weights_finite = torch.stack([torch.isfinite(p).all() for p in learner.parameters()]).all()
            finite = torch.isfinite(loss).all() & weights_finite  # tensors: no synchronization in every step
            self.first_bad_step = torch.minimum(self.first_bad_step, torch.where(finite, math.inf, float(step)))
            # sums stay on the device between log lines: no synchronization in every step
            window = self.window
            self.window = {"loss": window["loss"] + loss.mean().double(),
                           "accuracy": window["accuracy"] + accuracy.mean().double() * 100,
                           "count": window["count"] + 1}
            bar.update(1)

            if step % cfg.train.log_every == 0 or step == cfg.train.iterations:
                self.check_finite()
                now = time.perf_counter()
                self.train_seconds += now - tick
                window = self.window
                record = {"step": step, "split": "train", "loss": float(window["loss"]) / window["count"],
                          "accuracy": float(window["accuracy"]) / window["count"],
                          "its_per_s": window["count"] / max(now - tick, 1e-9)}
                if self.dist_ctx.is_main:
                    self.metrics.append(record, learning_rate=float(self.optimizer.param_groups[0]["lr"]))
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.1f}%")
                self.window = {"loss": 0.0, "accuracy": 0.0, "count": 0}
                tick = time.perf_counter()

            if step % cfg.train.val_every == 0 or step == cfg.train.iterations:
                self._validate()
                tick = time.perf_counter()

            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.iterations or self.early_stop["stopped"]:
                self.checkpoint()

    # ---- test ------------------------------------------------------------------------------------------------------
    def _test(self) -> RunResult:
        """Test the weights ``eval.checkpoint`` names; write results.json and curves.png (rank 0); print them."""
        cfg, dist_ctx, out_dir, step = self.cfg, self.dist_ctx, self.out_dir, self.step
        tested: Any = self.learner
        if cfg.eval.checkpoint == "ensemble":  # MAML++ (experiment_builder.py L247-290): the top validations
            tested = [build_learner(cfg, self.dtype, self.device) for _ in self.top]
            for member, entry in zip(tested, self.top):
                if dist_ctx.is_main:
                    path = top_checkpoint_path(out_dir, entry["step"])
                    load_learner_state(member, load_checkpoint(path, map_location=self.device), path)
                dist_ctx.broadcast_([*member.parameters(), *member.buffers()])
            fewer = (f"; only {len(self.top)} validations ran, eval.ensemble_size={cfg.eval.ensemble_size}"
                     if len(self.top) < cfg.eval.ensemble_size else "")
            chosen = (f"ensemble of the top {len(self.top)} validation checkpoints (steps "
                      f"{', '.join(str(e['step']) for e in self.top)}{fewer})")
        elif cfg.eval.checkpoint == "best" and dist_ctx.broadcast_object(self.best_path.exists()):  # rank 0's
            if dist_ctx.is_main:
                self.learner.load_state_dict(load_checkpoint(self.best_path, map_location=self.device)["learner"])
            dist_ctx.broadcast_([*self.learner.parameters(), *self.learner.buffers()])
            chosen = f"best validation (step {self.best['step']})"
        else:
            chosen = f"last (step {step})"
        start = time.perf_counter()
        test = self.evaluate("test", cfg.eval.tasks, seed=cfg.eval.seed, model=tested)
        dist_ctx.close()
        result = RunResult(out_dir=out_dir, test=test, checkpoint=chosen, step=step, best_val=self.best,
                           learner=self.learner)
        if not dist_ctx.is_main:
            return result
        results = {
            "test": test, "checkpoint": chosen, "best_val": self.best, **run_metadata(cfg, self.device),
            **({"ensemble": self.top} if cfg.eval.checkpoint == "ensemble" else {}),  # steps and val accuracies
            "train_wall_time_s": self.train_seconds, "test_wall_time_s": time.perf_counter() - start,
            "command": self.command, "processes": dist_ctx.world,
        }
        if cfg.train.early_stop_patience is not None:  # the best validation loss and its step (the retraining's)
            results["early_stop"] = {**self.early_stop, "patience": cfg.train.early_stop_patience,
                                     "steps_trained": step}
        atomic_write_text(out_dir / "results.json", to_json(results, indent=2))
        self.metrics.close()
        plot_curves(self.metrics.read(), out_dir / "curves.png", title=f"{cfg.preset} (seed {cfg.seed})",
                    test={**test, "step": step}, reference=OmegaConf.to_container(cfg.reference))
        ref = cfg.reference
        ci = f" ± {ref.ci95}" if ref.ci95 is not None else ""  # some papers give no interval
        paper = f" | paper: {ref.accuracy}{ci}% ({ref.source})" if ref.accuracy is not None else ""
        print(f"test accuracy ({chosen}): {test['accuracy']:.2f} ± {test['ci95']:.2f}% over {test['tasks']} "
              f"tasks{paper}")
        if "steps" in test:  # cbfinn/maml's test() prints every step's column
            columns = ", ".join(f"{s['step']}: {s['accuracy']:.2f}" for s in test["steps"])
            print(f"test accuracy after each inner step: {columns}")
        print(f"results: {(out_dir / 'results.json').resolve()}  curves: {(out_dir / 'curves.png').resolve()}")
        result.results = results
        return result


# ---- evaluation of a saved run -------------------------------------------------------------------------------------
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


def evaluate(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Test a saved run as ``meta-evaluate`` does: ``path`` is a checkpoint file, or a run folder (tested as its
    ``eval.checkpoint`` says: best.pt, checkpoint.pt or the top checkpoints' ensemble). ``overrides`` may change
    only what applies to a saved run (``EVAL_KEYS``). Writes ``results_<checkpoint>.json`` beside the checkpoint
    (``results_ensemble.json`` in the folder), prints the accuracy, and returns what it wrote with ``"out"``, its
    path. Raises :class:`RunError` with a one-line message on any problem."""
    overrides = list(overrides)
    path = Path(path)
    try:
        check_eval_overrides(overrides)
    except ConfigError as error:
        raise RunError(f"config error: {error}") from None
    if not path.exists():  # load_checkpoint names it
        return _evaluate(path, overrides)
    with run_folder_lock(path if path.is_dir() else path.parent,
                         advice="evaluate it when that run has finished (or copy the checkpoint elsewhere)"):
        return _evaluate(path, overrides)


def _evaluate(path: Path, overrides: list[str]) -> dict[str, Any]:
    folder = path.is_dir()  # a run folder: its checkpoint.pt holds the config and the list of top checkpoints
    try:
        state = load_checkpoint(path / "checkpoint.pt" if folder else path)
    except CheckpointError as error:
        raise RunError(f"checkpoint error: {error}") from None
    try:
        cfg = config_module.load_config(overrides, base=state["config"])
        device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    except (ConfigError, RuntimeError) as error:  # RuntimeError: device=cuda without a GPU
        raise RunError(f"config error: {error}") from None
    if not folder and any(a.startswith("eval.checkpoint=") for a in overrides):
        raise RunError(f"config error: eval.checkpoint chooses among the checkpoints of a run folder; pass the folder "
                       f"{path.parent} instead of the file {path.name}, or leave eval.checkpoint out to test this file")
    try:
        members = ensemble_members(path, state, cfg) if folder and cfg.eval.checkpoint == "ensemble" else []
    except ValueError as error:
        raise RunError(f"config error: {error}") from None
    if folder and not members:
        path = path / ("best.pt" if cfg.eval.checkpoint == "best" else "checkpoint.pt")
        try:
            state = load_checkpoint(path)
        except CheckpointError as error:
            raise RunError(f"checkpoint error: {error}") from None
    try:
        sampler = build_sampler(cfg, "test", device)
    except DataError as error:  # missing or corrupt files
        raise RunError(f"data error: {error}") from None
    except ValueError as error:  # a task shape the split cannot supply
        raise RunError(f"task error: {error}") from None
    learner = build_learner(cfg, dtype, device)
    tested: Any = learner
    try:
        if members:  # the ensemble, best first
            tested = [build_learner(cfg, dtype, device) for _ in members]
            for member, entry in zip(tested, members):
                file = top_checkpoint_path(path, entry["step"])
                load_learner_state(member, load_checkpoint(file, map_location=device), file)
        else:
            load_learner_state(learner, state, path)
    except CheckpointError as error:
        raise RunError(f"checkpoint error: {error}") from None
    test_rule = build_inner_rule(cfg, test=True)
    try:
        check_test_rule(cfg, learner, test_rule)
    except ValueError as error:  # an inner.test_lr that would change nothing
        raise RunError(f"config error: {error}") from None
    start = time.perf_counter()
    with tf32_allowed(cfg.tf32):
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
    return {**results, "out": out}
