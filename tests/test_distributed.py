"""Distributed meta-training (issue 13): torchrun with 2 CPU processes (gloo) against the 1-process run.

Runs launch ``python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/train_maml.py`` on tiny
synthetic data in float64 with one thread per process. In-process checks of the collectives start 2 gloo ranks
with ``torch.multiprocessing`` (a file store in the test's folder).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from meta.evaluation import evaluate_learner
from meta.experiments.tables import train_command
from meta.training.builders import build_learner, build_optimizer, build_samplers
from meta.training.checkpoints import load_checkpoint
from meta.training.config import load_config
from meta.training.distributed import (
    DistContext,
    DistributedError,
    DistributedMetaStep,
    check_distributable,
    one_line_errors,
)
from meta.training.errors import RunError
from tests.test_faults import run_script
from tests.test_training import REPO, run_cli, train_records

ARGS = [
    "data.dataset=synthetic", "data.synthetic_classes=20", "train.log_every=1", "train.val_every=3",
    "train.val_tasks=10", "train.checkpoint_every=3", "eval.tasks=20", "eval.batch_size=5", "progress=false",
    "device=cpu", "dtype=float64",
]
ODD = [*ARGS, "driver=vmap", "train.meta_batch=5"]  # 3 tasks on rank 0, 2 on rank 1
TOLERANCE = 1e-10  # float64 runs differing in summation order only; margins: docs/numerics.md


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess | None:
    """scripts/train_maml.py on ``nproc`` processes through torchrun; 1: in this process, without torchrun (no
    interpreter to start: the 1-process runs here are the references)."""
    if nproc == 1:
        message = run_script("train_maml.py", *args)
        assert message is None, message
        return None
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([sys.executable, *runner, str(REPO / "scripts/train_maml.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise AssertionError(f"{nproc} processes failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Global-norm relative difference of two tensor dicts with the same keys."""
    assert set(a) == set(b)
    diff = sum(((a[k] - b[k]).double() ** 2).sum() for k in a) ** 0.5
    return float(diff / sum((b[k].double() ** 2).sum() for k in b) ** 0.5)


def assert_same_run(out: Path, reference: Path) -> None:
    """Metrics, final weights and test result of ``out`` equal the reference's within TOLERANCE (relative)."""
    ours, theirs = train_records(out), train_records(reference)
    assert [(r["step"], r["split"]) for r in ours] == [(r["step"], r["split"]) for r in theirs]
    for a, b in zip(ours, theirs):
        for key, value in b.items():
            if isinstance(value, float):
                assert a[key] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), (a, b)
    state, ref = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt")
    assert state["step"] == ref["step"]
    assert relative_error(state["learner"], ref["learner"]) < TOLERANCE
    test, ref_test = (json.loads((d / "results.json").read_text())["test"] for d in (out, reference))
    assert test["accuracy"] == pytest.approx(ref_test["accuracy"], rel=TOLERANCE)
    assert test["loss"] == pytest.approx(ref_test["loss"], rel=TOLERANCE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 1-process run that the distributed ones must reproduce (6 steps, odd meta-batch)."""
    out = tmp_path_factory.mktemp("dist") / "one"
    launch(1, *ODD, "train.iterations=6", f"out_dir={out}")
    return out


def test_two_ranks_reproduce_the_one_process_run(reference, tmp_path):
    two = launch(2, *ODD, "train.iterations=6", f"out_dir={tmp_path}")
    assert "2 processes (gloo)" in two.stdout
    assert two.stdout.count("test accuracy (") == 1  # rank 0 alone prints the test line
    assert two.stdout.count("test accuracy after each inner step") == 1  # and the per-step line
    assert_same_run(tmp_path, reference)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["processes"] == 2 and len(results["test"]["task_accuracies"]) == 20
    # the test set was evaluated sharded over the 2 ranks: one process on the same weights gets exactly that
    assert results["checkpoint"].startswith("best")
    run_cli("evaluate.py", str(tmp_path / "best.pt"))  # in this process
    assert json.loads((tmp_path / "results_best.json").read_text())["test"] == results["test"]


def test_checkpoints_move_between_world_sizes(reference, tmp_path):
    for first, second in ((2, 1), (1, 2)):
        out = tmp_path / f"{first}to{second}"
        launch(first, *ODD, "train.iterations=3", f"out_dir={out}")
        state = load_checkpoint(out / "checkpoint.pt")
        assert state["step"] == 3 and not any("world" in key for key in state)
        launch(second, *ODD, "train.iterations=6", f"out_dir={out}", "resume=true")
        assert_same_run(out, reference)


def test_a_killed_rank_ends_the_run_in_bounded_time_with_the_checkpoint_intact(tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "scripts/train_maml.py"), *ODD, "train.iterations=100000", "train.val_every=100000",
         "train.checkpoint_every=2", "dist.timeout_s=30", f"out_dir={out}"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    ranks = {int(pid): Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in children}
    rank1 = [pid for pid, environ in ranks.items() if b"RANK=1" in environ]
    assert len(rank1) == 1, ranks.keys()
    os.kill(rank1[0], signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=90)
    assert proc.returncode != 0 and time.monotonic() - killed < 60
    assert "SIGKILL" in err and "train_maml.py FAILED" in err, err[-2000:]
    state = load_checkpoint(out / "checkpoint.pt")  # readable, complete (weights_only)
    assert state["step"] >= 2 and state["step"] % 2 == 0


def test_configs_that_cannot_run_distributed_are_refused_naming_the_key():
    cfg = load_config([*ODD, "train.meta_batch=3"])
    assert check_distributable(cfg, DistContext()) is None  # one process: nothing to refuse
    assert check_distributable(cfg, DistContext(rank=0, world=3)) is None
    refused = check_distributable(cfg, DistContext(rank=1, world=4))
    assert "train.meta_batch=3 is smaller than the 4 processes" in refused
    cfg.train.cuda_graph = True  # (set directly: validate() already refuses it on a CPU)
    assert "train.cuda_graph=true runs on one process" in check_distributable(cfg, DistContext(rank=0, world=2))


def test_the_table_runner_launches_its_runs_through_torchrun(tmp_path):
    assert train_command(Path("t.py"), 1) == [sys.executable, "t.py"]
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({"title": "tiny", "source": "this test", "cells": [
        {"name": "maml", "preset": "maml_omniglot_5w1s", "paper": {"accuracy": 98.7, "pm": 0.4, "pm_kind": "task_ci95"},
         "source": {"paper": "p", "table": "t", "code": "c"}}]}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts/reproduce.py"), str(spec), "--nproc", "2",
                           "--iterations", "2", "--out", str(tmp_path / "out"), *ARGS,
                           "train.meta_batch=2", "driver=vmap", "inner.test_steps=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "maml" / "seed0" / "results.json").read_text())
    assert results["processes"] == 2 and "2 processes (gloo)" in proc.stdout
    assert "maml_omniglot_5w1s" in (tmp_path / "out" / "table.md").read_text()


# ---- in-process: 2 gloo ranks started by torch.multiprocessing ---------------------------------------------------
#: name: (overrides, driver, training steps): MAML on both drivers, every algorithm, a rule with learnable tensors
CASES = {
    "maml_vmap": ([], "vmap", 5), "maml_loop": ([], "loop", 5),
    "metasgd": (["inner.rule=metasgd"], "vmap", 3),
    "mamlpp": (["algorithm=mamlpp", "inner.rule=mamlpp", "inner.steps=2", "mamlpp.msl_iterations=2",
                "mamlpp.first_order_iterations=1"], "loop", 3),
    "reptile": (["algorithm=reptile", "train.optimizer=sgd", "train.meta_lr=0.5", "inner.steps=2"], "vmap", 3),
    "imaml": (["algorithm=imaml", "inner.steps=2", "imaml.cg_steps=2"], "vmap", 3),
    "protonets": (["algorithm=protonets"], "vmap", 3),
}


def case_config(name: str):
    return load_config([*ODD, "train.meta_batch=5", *CASES[name][0]])


def train_steps(learner, sampler, step, steps: int) -> dict[str, torch.Tensor]:
    """``steps`` training steps of ``step(tasks)`` on the seed-0 task stream of meta-batch 5; the final weights."""
    generator = torch.Generator().manual_seed(0)
    for i in range(steps):
        learner.set_iteration(i, steps)  # MAML++'s schedules
        batch = sampler.sample(5, generator)
        step((batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y))
    return {k: v.detach().clone() for k, v in learner.state_dict().items()}


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world=2, local_rank=rank, backend="gloo")
    cfg = load_config([*ODD, "train.meta_batch=5"])
    learner = build_learner(cfg, torch.float64, torch.device("cpu"))
    samplers = build_samplers(cfg, torch.device("cpu"))
    out: dict = {}
    # sharded evaluation: each rank evaluates every other batch, every rank returns the gathered result
    out["eval"] = evaluate_learner(learner, samplers["test"], num_tasks=23, seed=7, batch_size=5,
                                   dtype=torch.float64, per_task=True, dist=ctx)
    # training steps: each rank's learner sees only its share; the gradients travel in one all_reduce per step
    seen, calls, all_reduce = [], [], dist.all_reduce
    dist.all_reduce = lambda tensor, **kw: calls.append(tensor.numel()) or all_reduce(tensor, **kw)
    for name, (_, driver, steps) in CASES.items():
        cfg = case_config(name)
        learner = build_learner(cfg, torch.float64, torch.device("cpu"))
        meta_gradient = learner.meta_gradient
        learner.meta_gradient = lambda tasks, f=meta_gradient, **kw: seen.append(len(tasks[0])) or f(tasks, **kw)
        out[name] = train_steps(learner, samplers["train"], DistributedMetaStep(
            learner, build_optimizer(cfg, learner), ctx, driver=driver, chunk_size=None, signals=[]), steps)
        out[name, "grads"] = sum(p.numel() for p in learner.parameters())
    dist.all_reduce = all_reduce
    out.update(seen=seen, calls=calls)
    # the auto driver: each rank may time a different winner; every rank then runs rank 0's
    cfg = case_config("maml_vmap")
    learner = build_learner(cfg, torch.float64, torch.device("cpu"))
    only = ("loop_autograd",) if rank == 0 else ("vmap",)
    learner.auto_driver.candidates = {"cpu": only, "cuda": only}
    out["auto"] = train_steps(learner, samplers["train"], DistributedMetaStep(
        learner, build_optimizer(cfg, learner), ctx, driver="auto", chunk_size=None, signals=[]), 2)
    out["auto_choices"] = list(learner.auto_driver.choices.values())
    try:  # a check that fails on one rank only ends both, with that rank's message
        ctx.agree("disk full" if rank == 1 else None)
    except RunError as stop:
        out["agree"] = str(stop)
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_collectives_shard_and_gather_exactly(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    cfg = load_config([*ODD, "train.meta_batch=5"])
    learner = build_learner(cfg, torch.float64, torch.device("cpu"))
    samplers = build_samplers(cfg, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same kernels, the same bits
    try:
        single = evaluate_learner(learner, samplers["test"], num_tasks=23, seed=7, batch_size=5,
                                  dtype=torch.float64, per_task=True)
    finally:
        torch.set_num_threads(threads)
    assert ranks[0]["eval"] == single and ranks[1]["eval"] == single  # exactly, every per-task accuracy included
    for name, (_, driver, steps) in CASES.items():  # the single-process steps, from the same initial weights
        cfg = case_config(name)
        learner = build_learner(cfg, torch.float64, torch.device("cpu"))
        step = functools.partial(learner.train_step, build_optimizer(cfg, learner), driver=driver)
        expected = train_steps(learner, samplers["train"], step, steps)
        for rank in range(2):
            assert relative_error(ranks[rank][name], expected) < TOLERANCE, (name, rank)
        assert all(torch.equal(ranks[0][name][k], ranks[1][name][k]) for k in expected)  # bit-identical ranks
    assert ranks[0]["auto_choices"] == ranks[1]["auto_choices"] == ["loop_autograd"]
    assert relative_error(ranks[1]["auto"], ranks[0]["auto"]) < TOLERANCE
    # one bucket per step: every gradient, the loss and accuracy sums and 2 control numbers
    calls = [ranks[0][name, "grads"] + 4 for name, (*_, steps) in CASES.items() for _ in range(steps)]
    for rank, share in ((0, 3), (1, 2)):
        assert ranks[rank]["seen"] == [share] * len(calls)
        assert ranks[rank]["calls"] == calls
        assert ranks[rank]["agree"] == "rank 1 of 2: disk full"


def test_a_failed_collective_is_a_one_line_error_naming_the_timeout(capsys):
    def timed_out(*args, **kwargs):
        raise dist.DistBackendError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv")

    ctx = DistContext(rank=1, world=2, timeout_s=5)
    with pytest.raises(DistributedError) as raised:
        ctx._run("all_reduce", timed_out)
    message = str(raised.value)
    assert message.startswith("rank 1 of 2: all_reduce failed") and "dist.timeout_s=5 s" in message
    assert "Timed out waiting 5000ms" in message and "resume=true" in message and "\n" not in message
    hook = one_line_errors(previous=lambda *args: pytest.fail("a DistributedError went to the default hook"))
    hook(DistributedError, raised.value, None)
    assert capsys.readouterr().err == f"distributed error: {message}\n"


def test_shares_cover_the_meta_batch_contiguously():
    for world in (1, 2, 3, 4):
        for total in range(world, 12):
            shares = [DistContext(rank=r, world=world).share(total) for r in range(world)]
            assert [s.start for s in shares] == [0, *(s.stop for s in shares[:-1])] and shares[-1].stop == total
            sizes = [s.stop - s.start for s in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.slow  # a torchrun job stopped by a signal (make test-fast leaves it out)
def test_sigterm_to_torchrun_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    """A scheduler's SIGTERM to torchrun (which passes it on to every rank): all ranks stop after the same step,
    rank 0 saves, the message says how to resume, and the resumed run equals the uninterrupted one."""
    from tests.test_training import wait_for_records

    args = [*ODD, "train.iterations=30", "train.val_every=30", "train.checkpoint_every=30"]
    out = tmp_path / "terminated"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*train_command(REPO / "scripts/train_maml.py", 2), *args, f"out_dir={out}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_records(out, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stopped = load_checkpoint(out / "checkpoint.pt")["step"]
    assert proc.returncode != 0 and 3 <= stopped < 30
    assert f"interrupted (SIGTERM): checkpoint saved at step {stopped}; continue with the same command plus " \
           f"resume=true" in err, err[-3000:]
    launch(1, *args, f"out_dir={out}", "resume=true")
    launch(1, *args, f"out_dir={tmp_path / 'one'}")
    assert_same_run(out, tmp_path / "one")
