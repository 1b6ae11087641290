"""MAML++'s protocol as HowToTrainYourMAMLPytorch runs it: schedules that move once per epoch
(``train.epoch_iterations``) and the test-time ensemble of the top validation checkpoints (``eval.checkpoint=
ensemble``), from the library functions to scripts/train_maml.py, scripts/evaluate.py and a resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import meta
from meta import rules
from meta.algorithms import MAMLPlusPlus, msl_weights
from meta.evaluation import ensemble_evaluate, evaluate_learner, query_logits
from meta.training.builders import (
    build_learner,
    build_sampler,
    meta_lr_at,
)
from meta.training.builders import test_inner_steps as eval_steps  # (a name pytest would collect)
from meta.training.checkpoints import load_checkpoint, top_checkpoint_path
from meta.training.config import ConfigError, load_config
from tests.helpers import random_tasks
from tests.test_distributed import ODD, TOLERANCE, launch
from tests.test_rules import perturb_rule_params, small_model
from tests.test_training import PINNED, run_cli, train_records

# ---- per-epoch schedules ------------------------------------------------------------------------


def test_per_epoch_cosine_is_torchs_cosine_annealing_stepped_once_per_epoch() -> None:
    # few_shot_learning_system.py L70-71: CosineAnnealingLR(T_max=total_epochs, eta_min=min_learning_rate), stepped
    # with the epoch index int(iter / total_iter_per_epoch) at every iteration (L345-346)
    epochs, per_epoch = 20, 50
    cfg = load_config(["preset=mamlpp_omniglot_5w1s", f"train.iterations={epochs * per_epoch}",
                       f"train.epoch_iterations={per_epoch}"])
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.train.meta_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.train.min_meta_lr)
    for epoch in range(epochs):
        expected = optimizer.param_groups[0]["lr"]
        for step in (epoch * per_epoch, epoch * per_epoch + 1, epoch * per_epoch + per_epoch - 1):
            assert meta_lr_at(cfg, step) == pytest.approx(expected, rel=1e-12), (epoch, step)
        optimizer.step()  # (no gradients: changes nothing; the scheduler expects it first)
        scheduler.step()
    assert meta_lr_at(cfg, 7 * per_epoch + 3) != meta_lr_at(cfg, 8 * per_epoch)  # it does move between epochs
    per_iteration = load_config(["preset=mamlpp_omniglot_5w1s", f"train.iterations={epochs * per_epoch}",
                                 "train.epoch_iterations=null"])
    assert meta_lr_at(per_iteration, 7 * per_epoch + 3) < meta_lr_at(per_iteration, 7 * per_epoch)


@pytest.mark.parametrize("step", [0, 1, 499, 500, 1234, 4999, 5000, 7321])
def test_per_epoch_msl_weights_and_derivative_order_follow_the_epoch_index(step: int) -> None:
    # few_shot_learning_system.py L83-103 (weights of current_epoch = int(iter / 500)), L232 (multi-step loss while
    # epoch < multi_step_loss_num_epochs), L304-305 (second order once epoch > first_order_to_second_order_epoch)
    per_epoch, msl_epochs, fo_epoch = 500, 10, 3
    learner = MAMLPlusPlus(small_model(), rules.mamlpp(lr=0.1, steps=5, per_step_bn=False), 5,
                           msl_iterations=msl_epochs * per_epoch, first_order_iterations=(fo_epoch + 1) * per_epoch,
                           epoch_iterations=per_epoch)
    learner.set_iteration(step, 50000)
    epoch = step // per_epoch
    if epoch < msl_epochs:
        assert torch.equal(learner.phase.step_weights, msl_weights(5, epoch / msl_epochs).double())
    else:
        assert learner.phase.step_weights is None
    assert learner.phase.first_order == (not epoch > fo_epoch)


def test_the_mamlpp_presets_schedule_per_epoch_of_500() -> None:
    cfg = load_config(["preset=mamlpp_omniglot_20w5s"])
    assert cfg.train.epoch_iterations == 500
    learner = build_learner(cfg, torch.float32, torch.device("cpu"))
    learner.set_iteration(499, cfg.train.iterations)
    lr, weights = meta_lr_at(cfg, 499), learner.phase.step_weights
    assert lr == cfg.train.meta_lr and torch.equal(weights, msl_weights(5, 0.0).float())
    learner.set_iteration(500, cfg.train.iterations)
    assert meta_lr_at(cfg, 500) < lr
    # epoch 1 of the multi-step loss's mamlpp.msl_iterations / 500 epochs (20 in the paper-era presets)
    assert torch.equal(learner.phase.step_weights, msl_weights(5, 500 / cfg.mamlpp.msl_iterations).float())


# ---- the ensemble -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks():
    return random_tasks(tasks=4, ways=5, shots=2, queries=3, size=8)


def mamlpp_learner(seed: int) -> meta.MetaLearner:
    learner = MAMLPlusPlus(small_model(norm="task_bn", kind="conv4", seed=seed),
                           rules.mamlpp(lr=0.2, steps=2), 2).double()
    perturb_rule_params(learner, seed)  # per-step batch-norm weights and step sizes that differ by step
    return learner


def test_query_logits_are_the_ones_the_evaluation_scores(tasks) -> None:
    learner = mamlpp_learner(0)
    loss, accuracy = learner.evaluate(tasks, inner_steps=3)
    logits = query_logits(learner, tasks, inner_steps=3)
    assert logits.shape == (4, 15, 5)
    assert torch.equal((logits.argmax(-1) == tasks[3]).double().mean(-1), accuracy)
    ce = F.cross_entropy(logits.flatten(0, 1), tasks[3].flatten(), reduction="none").view(4, 15).mean(-1)
    torch.testing.assert_close(ce, loss, rtol=1e-12, atol=1e-12)


def test_an_ensemble_of_copies_of_one_model_is_that_model(tasks) -> None:
    learner = mamlpp_learner(0)
    loss, accuracy = learner.evaluate(tasks)
    for k in (1, 3, 5):
        ens_loss, ens_accuracy = ensemble_evaluate([learner] * k, tasks)
        assert torch.equal(ens_accuracy, accuracy)
        torch.testing.assert_close(ens_loss, loss, rtol=1e-12, atol=1e-12)


def test_a_non_transductive_ensemble_of_one_model_is_that_models_non_transductive_evaluation(tasks) -> None:
    # eval.transductive=false reaches the ensemble: each member predicts each query with the support set alone
    learner = mamlpp_learner(0)
    loss, accuracy = learner.evaluate(tasks, transductive=False)
    assert not torch.equal(loss, learner.evaluate(tasks)[0])  # batch statistics differ, so the losses do
    ens_loss, ens_accuracy = ensemble_evaluate([learner] * 2, tasks, transductive=False)
    assert torch.equal(ens_accuracy, accuracy)
    torch.testing.assert_close(ens_loss, loss, rtol=1e-12, atol=1e-12)


def test_an_ensemble_of_two_models_averages_their_logits_task_by_task(tasks) -> None:
    # plain MAML learners: the adapted parameters of the loop driver, one task at a time, are all one needs
    learners = [meta.MetaLearner(small_model(norm="task_bn", kind="conv4", seed=seed), meta.sgd(lr=0.5),
                                 inner_steps=2) for seed in (0, 1)]
    expected_accuracy, expected_loss = [], []
    adapted = [lr.meta_gradient(tasks, driver="loop").adapted for lr in learners]
    for t in range(4):
        logits = [functional_call(lr.model, {k: v[t] for k, v in a.items()}, (tasks[2][t],))
                  for lr, a in zip(learners, adapted)]
        mean = (logits[0] + logits[1]) / 2
        expected_accuracy.append((mean.argmax(-1) == tasks[3][t]).double().mean())
        expected_loss.append(F.cross_entropy(mean, tasks[3][t]))
    loss, accuracy = ensemble_evaluate(learners, tasks)
    assert torch.equal(accuracy, torch.stack(expected_accuracy))
    torch.testing.assert_close(loss, torch.stack(expected_loss), rtol=1e-12, atol=1e-12)
    # the ensemble is not either member: on these tasks its predictions differ from each member's somewhere
    singles = [lr.evaluate(tasks)[1] for lr in learners]
    assert not all(torch.equal(accuracy, single) for single in singles)


def test_evaluate_learner_takes_an_ensemble_and_scores_its_predictions() -> None:
    cfg = load_config(["data.dataset=synthetic", "data.synthetic_classes=20", "device=cpu", "dtype=float64"])
    sampler = build_sampler(cfg, "test", torch.device("cpu"))
    learners = [build_learner(load_config([*overrides, "data.dataset=synthetic", f"seed={seed}"]), torch.float64,
                              torch.device("cpu")) for seed, overrides in ((0, []), (1, []))]
    kwargs = {"num_tasks": 12, "seed": 5, "batch_size": 5, "dtype": torch.float64, "per_task": True}
    single = evaluate_learner(learners[0], sampler, **kwargs)
    assert evaluate_learner([learners[0]] * 2, sampler, **kwargs)["task_accuracies"] == single["task_accuracies"]
    both = evaluate_learner(learners, sampler, **kwargs)
    mean = sum(both["task_accuracies"]) / 12
    assert both["accuracy"] == pytest.approx(mean) and both["tasks"] == 12
    # the expected value in float64 (a float32 std would use 2% of approx's default relative tolerance 1e-6)
    accuracies = torch.tensor(both["task_accuracies"], dtype=torch.float64)
    assert both["ci95"] == pytest.approx(1.96 * accuracies.std(unbiased=False).item()
                                         / math.sqrt(12))


def test_ensemble_config_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"eval.checkpoint='top5' is not one of \('best', 'last', 'ensemble'\)"):
        load_config(["eval.checkpoint=top5"])
    with pytest.raises(ConfigError, match="eval.ensemble_size must be positive"):
        load_config(["eval.checkpoint=ensemble", "eval.ensemble_size=0"])
    with pytest.raises(ConfigError, match="algorithm=protonets adapts none: use eval.checkpoint=best or last"):
        load_config(["preset=protonets_omniglot_5w1s", "eval.checkpoint=ensemble"])
    with pytest.raises(ConfigError, match="train.epoch_iterations must be positive"):
        load_config(["train.epoch_iterations=0"])


# ---- the training script, evaluate.py, resume and torchrun --------------------------------------

ENSEMBLE = [*PINNED, "train.val_every=2", "train.checkpoint_every=4", "eval.checkpoint=ensemble",
            "eval.ensemble_size=3", "train.iterations=10"]


def expected_top(out_dir: Path, size: int) -> list[tuple[int, float]]:
    """The top validations from metrics.jsonl, ranked as experiment_builder.py L251 (accuracy, then later step)."""
    val = [(r["step"], r["accuracy"]) for r in train_records(out_dir) if r["split"] == "val"]
    return sorted(val, key=lambda sv: (sv[1], sv[0]), reverse=True)[:size]


@pytest.mark.slow  # CLI runs in subprocesses
def test_training_keeps_the_top_validation_checkpoints_and_tests_their_ensemble(tmp_path) -> None:
    out = tmp_path / "run"
    proc = run_cli("train_maml.py", *ENSEMBLE, f"out_dir={out}")
    results = json.loads((out / "results.json").read_text())
    top = expected_top(out, 3)
    assert len(train_records(out)) > 10 and len(top) == 3
    assert [(e["step"], e["accuracy"]) for e in results["ensemble"]] == top
    assert sorted(p.name for p in out.glob("top_step*.pt")) == sorted(f"top_step{s:07d}.pt" for s, _ in top)
    for step, accuracy in top:  # each file holds the model validated at its step
        state = load_checkpoint(top_checkpoint_path(out, step))
        assert state["step"] == step and state["val"]["accuracy"] == accuracy
    steps = ", ".join(str(s) for s, _ in top)
    assert results["checkpoint"] == f"ensemble of the top 3 validation checkpoints (steps {steps})"
    assert f"test accuracy (ensemble of the top 3 validation checkpoints (steps {steps}))" in proc.stdout

    # the test accuracy is the ensemble's, recomputed here from the three files
    cfg = load_config([], base=load_checkpoint(out / "checkpoint.pt")["config"])
    members = []
    for step, _ in top:
        member = build_learner(cfg, torch.float32, torch.device("cpu"))
        member.load_state_dict(load_checkpoint(top_checkpoint_path(out, step))["learner"])
        members.append(member)
    sampler = build_sampler(cfg, "test", torch.device("cpu"))
    again = evaluate_learner(members, sampler, num_tasks=cfg.eval.tasks, seed=cfg.eval.seed,
                             batch_size=cfg.eval.batch_size, inner_steps=eval_steps(cfg), per_task=True)
    assert again["task_accuracies"] == results["test"]["task_accuracies"]
    single = evaluate_learner(members[0], sampler, num_tasks=cfg.eval.tasks, seed=cfg.eval.seed,
                              batch_size=cfg.eval.batch_size, inner_steps=eval_steps(cfg), per_task=True)
    assert single["task_accuracies"] != results["test"]["task_accuracies"]  # not just the best member

    # evaluate.py on the run folder agrees exactly, and takes fewer members but not more
    evaluated = run_cli("evaluate.py", str(out))
    assert f"ensemble of the top 3 validation checkpoints: steps {steps}" in evaluated.stdout
    assert json.loads((out / "results_ensemble.json").read_text())["test"] == results["test"]
    run_cli("evaluate.py", str(out), "eval.ensemble_size=2")
    assert [e["step"] for e in json.loads((out / "results_ensemble.json").read_text())["ensemble"]] == [
        s for s, _ in top[:2]]
    for args, message in (
        (["eval.ensemble_size=4"], "config error: eval.ensemble_size=4, but the run in {out} kept its top 3 "
                                   "validation checkpoints (eval.ensemble_size in training); pass "
                                   "eval.ensemble_size=3 or less"),
        (["eval.checkpoint=top5"], "eval.checkpoint='top5' is not one of ('best', 'last', 'ensemble')"),
    ):
        proc = run_cli("evaluate.py", str(out), *args, check=False)
        assert proc.returncode != 0 and message.format(out=out) in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("evaluate.py", str(out / "best.pt"), "eval.checkpoint=ensemble", check=False)
    assert proc.returncode != 0 and f"pass the folder {out} instead of the file best.pt" in proc.stderr


@pytest.mark.slow  # CLI runs in subprocesses
def test_a_run_without_the_ensemble_cannot_be_tested_as_one(tmp_path) -> None:
    out = tmp_path / "best"
    run_cli("train_maml.py", *PINNED, "train.iterations=3", f"out_dir={out}")
    assert not list(out.glob("top_step*.pt"))
    proc = run_cli("evaluate.py", str(out), "eval.checkpoint=ensemble", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (f"config error: eval.checkpoint=ensemble, but the run in {out} kept no top validation checkpoints (it "
            f"trained with eval.checkpoint=best)") in proc.stderr
    # nor switched to one on resume: the checkpoints before it were not kept
    proc = run_cli("train_maml.py", *PINNED, "train.iterations=6", f"out_dir={out}", "resume=true",
                   "eval.checkpoint=ensemble", check=False)
    assert proc.returncode != 0 and "eval.checkpoint='best' -> 'ensemble'" in proc.stderr


@pytest.mark.slow  # CLI runs in subprocesses
def test_a_resumed_run_keeps_the_same_top_checkpoints_as_an_uninterrupted_one(tmp_path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_cli("train_maml.py", *ENSEMBLE, f"out_dir={whole}")
    run_cli("train_maml.py", *[a for a in ENSEMBLE if a != "train.iterations=10"], "train.iterations=5",
            f"out_dir={resumed}")
    kept = sorted(p.name for p in resumed.glob("top_step*.pt"))
    assert len(kept) == 3
    # a kill after a validation and before the next checkpoint leaves a top file the checkpoint does not list
    shutil.copy(resumed / kept[0], resumed / "top_step0000007.pt")
    run_cli("train_maml.py", *ENSEMBLE, f"out_dir={resumed}", "resume=true")
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, resumed))
    assert a["ensemble"] == b["ensemble"] and a["test"] == b["test"]
    assert sorted(p.name for p in resumed.glob("top_step*.pt")) == sorted(p.name for p in whole.glob("top_step*.pt"))


@pytest.mark.slow  # torchrun with 2 CPU processes
def test_the_ensemble_test_is_sharded_under_torchrun_as_one_process_computes_it(tmp_path) -> None:
    args = [*ODD, "train.iterations=6", "train.val_every=2", "eval.checkpoint=ensemble", "eval.ensemble_size=2"]
    launch(1, *args, f"out_dir={tmp_path / 'one'}")
    two = launch(2, *args, f"out_dir={tmp_path / 'two'}")
    assert "2 processes (gloo)" in two.stdout
    one, both = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert both["processes"] == 2 and [e["step"] for e in both["ensemble"]] == [e["step"] for e in one["ensemble"]]
    assert both["test"]["task_accuracies"] == one["test"]["task_accuracies"]
    assert both["test"]["loss"] == pytest.approx(one["test"]["loss"], rel=TOLERANCE)
    run_cli("evaluate.py", str(tmp_path / "two"))  # one process on the same files: exactly the sharded result
    assert json.loads((tmp_path / "two" / "results_ensemble.json").read_text())["test"] == both["test"]
