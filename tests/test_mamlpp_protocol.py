"""MAML++'s protocol as HowToTrainYourMAMLPytorch runs it: schedules that move once per epoch
(``train.epoch_iterations``) and the test-time ensemble of the top validation checkpoints (``eval.checkpoint=
ensemble``), from the library functions to scripts/train_maml.py, scripts/evaluate.py and a resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import meta
from meta import rules
from meta.algorithms import MAMLPlusPlus, msl_weights
from meta.evaluation import ensemble_evaluate, evaluate_learner, query_logits
from meta.training.builders import apply_schedules, build_learner, build_optimizer, meta_lr_at
from meta.training.config import ConfigError, load_config
from tests.helpers import random_tasks
from tests.test_rules import perturb_rule_params, small_model

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
    optimizer = build_optimizer(cfg, learner)
    apply_schedules(cfg, learner, optimizer, 499)
    lr, weights = optimizer.param_groups[0]["lr"], learner.phase.step_weights
    assert lr == cfg.train.meta_lr and torch.equal(weights, msl_weights(5, 0.0).float())
    apply_schedules(cfg, learner, optimizer, 500)
    assert optimizer.param_groups[0]["lr"] < lr
    assert torch.equal(learner.phase.step_weights, msl_weights(5, 0.1).float())


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
    from meta.training.builders import build_sampler

    sampler = build_sampler(cfg, "test", torch.device("cpu"))
    learners = [build_learner(load_config([*overrides, "data.dataset=synthetic", f"seed={seed}"]), torch.float64,
                              torch.device("cpu")) for seed, overrides in ((0, []), (1, []))]
    kwargs = {"num_tasks": 12, "seed": 5, "batch_size": 5, "dtype": torch.float64, "per_task": True}
    single = evaluate_learner(learners[0], sampler, **kwargs)
    assert evaluate_learner([learners[0]] * 2, sampler, **kwargs)["task_accuracies"] == single["task_accuracies"]
    both = evaluate_learner(learners, sampler, **kwargs)
    mean = sum(both["task_accuracies"]) / 12
    assert both["accuracy"] == pytest.approx(mean) and both["tasks"] == 12
    assert both["ci95"] == pytest.approx(1.96 * torch.tensor(both["task_accuracies"]).std(unbiased=False).item()
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
