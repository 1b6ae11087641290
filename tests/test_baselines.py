"""learn2learn's MAML as a baseline (meta/baselines) and the three-way experiment (experiments/three_way/run.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meta.baselines import check_learn2learn_expressible, learn2learn_meta_gradient
from meta.models import relative_error
from meta.training.builders import build_learner, build_sampler
from meta.training.config import load_config

pytest.importorskip("learn2learn")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-10  # same math in another summation order: ~1e-15 apart, >= 100x margin on every path (docs/numerics.md)
#: the three-way experiment's cell: MAML's 5w1s preset with the norm adapted (learn2learn adapts every parameter),
#: on synthetic data; the rest is cbfinn/maml's (inner loss summed over shots, beta-only batch norm, MAML's init)
CELL = ["preset=maml_omniglot_5w1s", "inner.adapt_norm=true", "data.dataset=synthetic", "data.synthetic_classes=20"]


def setting(*extra: str):
    """A float64 learner from the config and a tiny batch of 3 tasks from the training stream of seed 0."""
    cfg = load_config([*CELL, *extra])
    learner = build_learner(cfg, torch.float64, torch.device("cpu"))
    batch = build_sampler(cfg, "train", torch.device("cpu")).sample(3, torch.Generator().manual_seed(0))
    return cfg, learner, (batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y)


@pytest.mark.parametrize("extra", [
    [],  # the three-way cell as it runs: 1 step at 0.4 on the loss summed over shots, second order
    ["inner.steps=2", "task.shots=2", "task.queries=2"],  # several steps and shots: sum / K is not the sum
    ["inner.first_order=true", "inner.steps=2"],
    ["inner.loss_reduction=mean", "model.norm_affine=gamma_beta", "model.init=xavier"],
], ids=["cell", "two_steps_two_shots", "first_order", "mean_loss_gamma_beta"])
def test_learn2learn_meta_gradient_equals_the_vmap_learners_in_float64(extra):
    cfg, learner, tasks = setting(*extra)
    ours = learner.meta_gradient(tasks, driver="vmap")
    theirs = learn2learn_meta_gradient(learner.model, tasks, cfg.inner.lr, cfg.inner.steps,
                                       first_order=cfg.inner.first_order, loss_reduction=cfg.inner.loss_reduction)
    assert relative_error(ours.grads, theirs.grads) < TOL
    assert torch.allclose(ours.loss, theirs.loss, rtol=TOL, atol=0)
    assert torch.equal(ours.accuracy, theirs.accuracy)
    assert all(p.grad is None for p in learner.model.parameters())  # the baseline leaves .grad alone


def test_the_comparison_sees_the_inner_loss_scale():
    # the same batch with learn2learn on the mean loss: a different meta-gradient, so the test above checks the
    # sum over shots too (N x the mean: a 5x larger inner step)
    cfg, learner, tasks = setting()
    ours = learner.meta_gradient(tasks, driver="vmap")
    mean = learn2learn_meta_gradient(learner.model, tasks, cfg.inner.lr, cfg.inner.steps, loss_reduction="mean")
    assert relative_error(ours.grads, mean.grads) > 1e-2
    with pytest.raises(ValueError, match="unknown inner loss reduction 'sum'"):
        learn2learn_meta_gradient(learner.model, tasks, cfg.inner.lr, 1, loss_reduction="sum")


@pytest.mark.parametrize("override,key", [
    ("inner.adapt_norm=false", "inner.adapt_norm=False cannot be expressed by learn2learn's MAML .*adapts every"),
    ("inner.rule=metasgd", "inner.rule=metasgd cannot be expressed"),
    ("inner.learnable_lr=true", "inner.learnable_lr=True cannot be expressed"),
    ("inner.batch_size=2", "inner.batch_size=2 cannot be expressed"),
    ("algorithm=mamlpp", "algorithm=mamlpp cannot be expressed"),
])
def test_configs_learn2learn_cannot_express_are_refused_naming_the_key(override, key):
    check_learn2learn_expressible(load_config(CELL))
    with pytest.raises(ValueError, match=key):
        check_learn2learn_expressible(load_config([*CELL, override]))
    # the MAML preset as published does not adapt its norm: learn2learn cannot run it as it is
    with pytest.raises(ValueError, match=r"set inner.adapt_norm=True"):
        check_learn2learn_expressible(load_config(["preset=maml_omniglot_5w1s"]))


@pytest.mark.parametrize("driver", ["loop", "loop_autograd", "loop_threads"])
def test_loop_drivers_run_second_order_maml_with_an_inner_adapted_shift_only_norm(driver):
    # the fused CPU batch-norm kernel has no double backward for a bias without a weight; before meta/models/networks.py
    # passed a constant weight, these drivers raised RuntimeError on exactly the three-way cell
    _, learner, tasks = setting()
    vmap = learner.meta_gradient(tasks, driver="vmap")
    loop = learner.meta_gradient(tasks, driver=driver)
    assert relative_error(vmap.grads, loop.grads) < TOL
    assert vmap.grads["features.0.norm.bias"].abs().max() > 1e-6  # the shift is in play


def run_three_way(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "experiments" / "three_way" / "run.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True)


def test_three_way_experiment_trains_three_coinciding_curves(tmp_path):
    out = tmp_path / "three"
    proc = run_three_way(tmp_path, "--iterations", "3", "--out", str(out), "--test-tasks", "4",
                         "data.dataset=synthetic", "data.synthetic_classes=20", "train.meta_batch=2", "dtype=float64",
                         "device=cpu", "eval.batch_size=4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["ways"] == ["vmap", "loop", "learn2learn"] and results["config"]["inner"]["adapt_norm"] is True
    curves = results["curves"]
    for way in results["ways"]:
        assert len(curves[way]["loss"]) == len(curves[way]["accuracy"]) == len(curves[way]["seconds"]) == 3
        assert all(s > 0 for s in curves[way]["seconds"])
        assert results["summary"][way]["test"]["tasks"] == 4
    for gap in results["gaps"].values():  # float64: the same training run three times, to rounding
        assert gap["max_loss_gap"] < 1e-10 and gap["max_accuracy_gap"] == 0 and gap["first_loss_split_1e-4"] is None
        # weights the output depends on agree; a conv bias before batch norm gets roundoff gradients only
        assert max(v for k, v in gap["weight_gaps"].items() if "conv.bias" not in k) < 1e-8
    assert len({results["summary"][w]["test"]["accuracy"] for w in results["ways"]}) == 1
    assert curves["vmap"]["loss"][0] != curves["vmap"]["loss"][-1]  # it trained
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,message", [
    (["--ways", "vmap,jax"], "argument error: --ways 'vmap,jax'"),
    (["inner.rule=metasgd"], "config error: inner.rule=metasgd cannot be expressed by learn2learn's MAML"),
    (["--preset", "reptile_omniglot_5w1s"], "config error: algorithm=reptile"),
])
def test_three_way_experiment_refuses_bad_input_in_one_line(tmp_path, args, message):
    proc = run_three_way(tmp_path, *args, "--out", str(tmp_path / "x"), "data.dataset=synthetic")
    assert proc.returncode != 0 and message in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "gym" not in line.lower() and line.strip()]) == 1
