"""MAML++, Reptile, iMAML and ProtoNets: both drivers, closed forms and references, presets and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import meta
from meta import rules
from meta.algorithms import (
    IMAML,
    MAMLPlusPlus,
    ProtoNet,
    Reptile,
    conjugate_gradient,
    implicit_meta_grad,
    msl_weights,
    prototype_logits,
    proximal_adapt,
)
from meta.models import relative_error
from meta.training.builders import build_learner, build_optimizer, meta_lr_at
from meta.training.config import load_config
from tests.helpers import random_tasks
from tests.test_rules import TOL, assert_same, small_model
from tests.test_training import TINY, run_cli

PRESETS = ["metasgd", "anil", "mamlpp", "metacurvature", "clipped_sgd", "reptile", "imaml", "protonets"]


@pytest.fixture(scope="module")
def tasks():
    return random_tasks(tasks=3, ways=5, shots=2, queries=2, size=8)


# ---- MAML++ -------------------------------------------------------------------------------------


def official_msl_weights(n_steps: int, epoch: float, msl_epochs: int) -> np.ndarray:
    """``get_per_step_loss_importance_vector`` of HowToTrainYourMAMLPytorch, transcribed."""
    loss_weights = np.ones(n_steps) * (1.0 / n_steps)
    decay_rate = 1.0 / n_steps / msl_epochs
    min_value = 0.03 / n_steps
    for i in range(n_steps - 1):
        loss_weights[i] = np.maximum(loss_weights[i] - epoch * decay_rate, min_value)
    final = loss_weights[-1] + epoch * (n_steps - 1) * decay_rate
    loss_weights[-1] = np.minimum(final, 1.0 - (n_steps - 1) * min_value)
    return loss_weights


@pytest.mark.parametrize("epoch", [0, 1, 3.5, 10, 12])
def test_msl_weights_match_the_official_formula(epoch):
    ours = msl_weights(5, epoch / 10).numpy()
    np.testing.assert_allclose(ours, official_msl_weights(5, epoch, 10), rtol=1e-12, atol=1e-15)
    assert ours.sum() == pytest.approx(1.0)


def test_mamlpp_multi_step_loss_is_the_weighted_sum_of_per_step_query_losses(tasks):
    model = small_model(norm="task_bn")
    rule = rules.mamlpp(lr=0.3, steps=3)
    learner = MAMLPlusPlus(model, rule, 3, msl_iterations=100)
    perturb = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in learner.rule_params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=perturb, dtype=p.dtype))
    learner.set_iteration(40, 1000)
    weights = msl_weights(3, 0.4).double()
    assert torch.equal(learner.phase.step_weights, weights)
    vm, loop = learner.meta_gradient(tasks, driver="vmap"), learner.meta_gradient(tasks, driver="loop")
    assert_same(vm, loop)
    per_step = [meta.MetaLearner(model, rule, i + 1) for i in range(3)]
    for single in per_step:
        single.rule_params.load_state_dict(learner.rule_params.state_dict())
    expected = sum(w * single.meta_gradient(tasks, driver="loop").loss for w, single in zip(weights, per_step))
    assert relative_error({"l": vm.loss}, {"l": expected}) < TOL
    learner.set_iteration(100, 1000)  # annealing over: the last step only
    assert learner.phase.step_weights is None
    assert_same(learner.meta_gradient(tasks), per_step[-1].meta_gradient(tasks))


def test_mamlpp_with_every_switch_off_is_maml_and_derivative_order_anneals(tasks):
    model = small_model(norm="task_bn")
    maml = meta.MetaLearner(model, meta.sgd(lr=0.3), inner_steps=2).meta_gradient(tasks)
    off = MAMLPlusPlus(model, rules.mamlpp(lr=0.3, steps=2, lslr=False, per_step_bn=False), 2)
    off.set_iteration(0, 10)
    assert_same(off.meta_gradient(tasks), maml)
    annealed = MAMLPlusPlus(model, rules.mamlpp(lr=0.3, steps=2, lslr=False, per_step_bn=False), 2,
                            first_order_iterations=5)
    fomaml = meta.MetaLearner(model, meta.first_order(meta.sgd(lr=0.3)), inner_steps=2).meta_gradient(tasks)
    annealed.set_iteration(4, 10)
    assert annealed.active_rule().first_order and not annealed.rule.first_order  # the learner's rule is kept
    assert_same(annealed.meta_gradient(tasks, driver="vmap"), fomaml)
    annealed.set_iteration(5, 10)
    assert not annealed.active_rule().first_order
    assert_same(annealed.meta_gradient(tasks, driver="vmap"), maml)


def test_meta_lr_schedules():
    # per iteration (the MAML++ presets step it per epoch of 500: tests/test_mamlpp_protocol.py)
    cfg = load_config(["preset=mamlpp_omniglot_5w1s", "train.iterations=100", "train.epoch_iterations=null"])
    assert meta_lr_at(cfg, 0) == pytest.approx(1e-3) and meta_lr_at(cfg, 100) == pytest.approx(1e-5)
    assert meta_lr_at(cfg, 50) == pytest.approx((1e-3 + 1e-5) / 2)
    cfg = load_config(["preset=reptile_omniglot_5w1s", "train.iterations=100"])
    assert [meta_lr_at(cfg, s) for s in (0, 25, 100)] == pytest.approx([1.0, 0.75, 0.0])
    assert meta_lr_at(load_config([]), 37) == 1e-3  # constant by default
    cfg = load_config(["preset=protonets_omniglot_5w1s"])  # Snell et al.: Adam 1e-3, halved every 2000 episodes
    expected = [1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4]
    assert [meta_lr_at(cfg, s) for s in (0, 1999, 2000, 4000, 6001)] == pytest.approx(expected)


# ---- Reptile ------------------------------------------------------------------------------------


def test_reptile_vmap_matches_loop_and_one_sgd_step_is_the_support_gradient(tasks):
    # group norm: with task_bn the biases before each norm have zero gradient up to roundoff, which Adam's
    # g / (|g| + eps) turns into 1e-10-sized differences between the drivers
    model = small_model(norm="group")
    learner = Reptile(model, rules.adam(lr=1e-2, beta1=0.0), inner_steps=3)
    vm, loop = learner.meta_gradient(tasks, driver="vmap"), learner.meta_gradient(tasks, driver="loop")
    assert_same(vm, loop)
    assert relative_error(vm.adapted, loop.adapted) < TOL
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert relative_error(vm.grads, {k: params[k] - vm.adapted[k].mean(0) for k in params}) < TOL

    one = Reptile(model, meta.sgd(lr=0.1), inner_steps=1).meta_gradient(tasks)
    support = [grad(lambda p, x=x, y=y: F.cross_entropy(functional_call(model, p, (x,)), y))(params)
               for x, y in zip(tasks[0], tasks[1])]
    expected = {k: 0.1 * torch.stack([s[k] for s in support]).mean(0) for k in params}
    assert relative_error(one.grads, expected) < TOL


def test_reptile_refuses_learnable_rule_parameters():
    with pytest.raises(ValueError, match="Reptile cannot train"):
        Reptile(small_model(), rules.metasgd(), inner_steps=1)


# ---- iMAML --------------------------------------------------------------------------------------


def test_imaml_matches_the_closed_form_on_a_quadratic():
    g = torch.Generator().manual_seed(0)
    d, lam = 6, 2.0
    q = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = q @ q.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    b, c, theta = (torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3))

    def support(p):
        return 0.5 * p["w"] @ a @ p["w"] - b @ p["w"]

    def query(p):
        return 0.5 * ((p["w"] - c) ** 2).sum()

    eye = torch.eye(d, dtype=torch.float64)
    phi_star = torch.linalg.solve(a + lam * eye, b + lam * theta)
    phi = proximal_adapt(support, meta.sgd(lr=0.2), {"w": theta}, {}, lam, steps=400)
    assert torch.allclose(phi["w"], phi_star, rtol=1e-12, atol=1e-12)
    # d phi*/d theta = lam (A + lam I)^-1, so the meta-gradient is lam (A + lam I)^-1 (phi* - c)
    expected = lam * torch.linalg.solve(a + lam * eye, phi_star - c)
    ours = implicit_meta_grad(support, query, {"w": phi_star}, lam, cg_steps=d)
    assert torch.allclose(ours["w"], expected, rtol=1e-10, atol=1e-12)
    # and CG alone solves an SPD system in d steps
    x = conjugate_gradient(lambda v: {"w": a @ v["w"]}, {"w": b}, steps=d)
    assert torch.allclose(x["w"], torch.linalg.solve(a, b), rtol=1e-9, atol=1e-11)


def test_imaml_implicit_gradient_equals_unrolled_differentiation_at_convergence(tasks):
    torch.manual_seed(0)  # only the weights of this tiny softmax-regression model
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    sx, sy, qx, qy = (t[0] for t in tasks)
    sx, qx = sx / 8, qx / 8  # a smooth support loss, so that GD with lr 0.3 contracts fast
    lam, steps, n = 2.0, 150, sum(p.numel() for p in params.values())

    def support(p):
        return F.cross_entropy(functional_call(model, p, (sx,)), sy)

    def query(p):
        return F.cross_entropy(functional_call(model, p, (qx,)), qy)

    rule = meta.sgd(lr=0.3)
    unrolled = grad(lambda theta: query(proximal_adapt(support, rule, theta, {}, lam, steps)))(params)
    phi = proximal_adapt(support, rule, params, {}, lam, steps)
    implicit = implicit_meta_grad(support, query, phi, lam, cg_steps=n)
    assert relative_error(implicit, unrolled) < 1e-9


def test_imaml_vmap_matches_loop_and_evaluate(tasks):
    model = small_model(norm="task_bn")
    learner = IMAML(model, meta.sgd(lr=0.1), inner_steps=4, lam=2.0, cg_steps=3)
    vm, loop = learner.meta_gradient(tasks, driver="vmap"), learner.meta_gradient(tasks, driver="loop")
    assert_same(vm, loop)
    loss, accuracy = learner.evaluate(tasks)
    assert relative_error({"l": loss}, {"l": vm.loss}) < TOL and torch.equal(accuracy, vm.accuracy)
    test_time = IMAML(model, meta.sgd(lr=0.1), inner_steps=4, lam=2.0, test_lam=0.0).evaluate(tasks)[0]
    plain = meta.MetaLearner(model, meta.sgd(lr=0.1), 4).evaluate(tasks)[0]
    assert relative_error({"l": test_time}, {"l": plain}) < TOL


# ---- ProtoNets ----------------------------------------------------------------------------------


def test_prototype_logits_are_negative_squared_distances():
    g = torch.Generator().manual_seed(0)
    # float64: in float32 the two sides (a mean by matmul, squared differences summed; torch.dist squared) differ by
    # float32 rounding, up to 5e-7 of the distance, which left rel=1e-5 an 84x margin
    support = torch.randn(6, 4, generator=g, dtype=torch.float64)
    query = torch.randn(5, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = prototype_logits(support, labels, query, ways=3)
    for i in range(5):
        for n in range(3):
            prototype = support[labels == n].mean(0)
            assert logits[i, n] == pytest.approx(-float(torch.dist(query[i], prototype) ** 2), rel=1e-12)


def test_prototype_logits_leave_out_classes_without_support_examples():
    g = torch.Generator().manual_seed(1)
    support = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    query, labels = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    exact, bounded = prototype_logits(support, labels, query, ways=3), prototype_logits(support, labels, query, ways=7)
    assert torch.equal(bounded[:, :3], exact) and bool((bounded[:, 3:] == float("-inf")).all())
    targets = torch.tensor([0, 2, 1, 1, 0])
    loss_exact, loss_bounded = F.cross_entropy(exact, targets), F.cross_entropy(bounded, targets)
    assert float(loss_bounded) == pytest.approx(float(loss_exact), rel=1e-14)
    (grad_exact,), (grad_bounded,) = (torch.autograd.grad(loss, support) for loss in (loss_exact, loss_bounded))
    assert torch.isfinite(grad_bounded).all() and torch.allclose(grad_bounded, grad_exact, rtol=1e-12, atol=0)


def test_protonet_with_more_ways_than_the_episode_gives_the_same_results(tasks):
    exact, bounded = ProtoNet(small_model(norm="task_bn"), ways=5), ProtoNet(small_model(norm="task_bn"), ways=12)
    bounded.load_state_dict(exact.state_dict())
    for driver in ("vmap", "loop"):
        assert_same(bounded.meta_gradient(tasks, driver=driver), exact.meta_gradient(tasks, driver=driver))


def test_protonet_vmap_matches_loop_and_uses_the_embedding(tasks):
    model = small_model(norm="task_bn")
    learner = ProtoNet(model, ways=5)
    vm, loop = learner.meta_gradient(tasks, driver="vmap"), learner.meta_gradient(tasks, driver="loop")
    assert_same(vm, loop)
    assert float(vm.grads["head.weight"].abs().max()) == 0  # the head is unused
    sx, sy, qx, qy = (t[1] for t in tasks)
    with torch.no_grad():
        embedded = model.embed(torch.cat([sx, qx]))
    logits = prototype_logits(embedded[: len(sx)], sy, embedded[len(sx):], 5)
    assert float(vm.loss[1]) == pytest.approx(float(F.cross_entropy(logits, qy)), rel=1e-12)


# ---- presets and the CLI ------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_and_takes_a_step(name):
    cfg = load_config([f"preset={name}_omniglot_5w1s", "data.image_size=16", "inner.steps=2", "inner.test_steps=2",
                       "inner.options.steps=2" if name == "mamlpp" else "seed=0"])
    learner = build_learner(cfg, torch.float64, torch.device("cpu"))
    optimizer = build_optimizer(cfg, learner)
    learner.set_iteration(0, cfg.train.iterations)
    batch = random_tasks(tasks=2, ways=5, shots=1, queries=cfg.task.queries, size=16)
    before = {k: v.detach().clone() for k, v in learner.named_parameters()}
    # protonets and reptile presets pin their own driver
    result = learner.meta_gradient(batch, driver="vmap" if cfg.driver == "auto" else cfg.driver)
    learner.write_grads(result)
    optimizer.step()
    assert any(not torch.equal(v, before[k]) for k, v in learner.named_parameters())
    loss, accuracy = learner.evaluate(batch, inner_steps=2)
    assert loss.shape == accuracy.shape == (2,) and torch.isfinite(loss).all()


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
@pytest.mark.parametrize("name", ["mamlpp", "reptile"])
def test_cli_trains_the_algorithm_on_synthetic_data(tmp_path, name):
    out = tmp_path / name
    extra = ["inner.steps=2", "inner.test_steps=2", "mamlpp.msl_iterations=2", "mamlpp.first_order_iterations=1",
             "inner.options.steps=2"] if name == "mamlpp" else ["inner.test_steps=3"]
    proc = run_cli("train_maml.py", f"preset={name}_omniglot_5w1s", *TINY, "data.image_size=16",
                   "train.iterations=4", "eval.tasks=10", *extra, f"out_dir={out}")
    assert "test accuracy" in proc.stdout
    assert json.loads((out / "results.json").read_text())["test"]["tasks"] == 10


def test_rule_options_are_checked_against_the_factory():
    from meta.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"inner.options \['clp'\]"):
        load_config(["inner.rule=clipped_sgd", "inner.options.clp=1.0"])
    # clipped_sgd takes per-sample gradients: it needs a norm without batch statistics
    cfg = load_config(["inner.rule=clipped_sgd", "inner.options.clip=2.0", "model.norm=group"])
    assert cfg.inner.options.clip == 2.0
