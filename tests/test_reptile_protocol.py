"""openai/supervised-reptile's protocol knobs: the inner Adam's state carried across tasks and meta-iterations
(``inner.persistent_state``), non-transductive evaluation (``eval.transductive=false``), the test-time inner
mini-batch (``inner.test_batch_size``), the summed inner loss and TF's epsilon-hat, each against a hand-written
reference (float64, < 1e-10)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import meta
from meta import rules
from meta.algorithms import Reptile
from meta.models import relative_error
from meta.training.builders import build_learner
from meta.training.config import ConfigError, load_config
from meta.training.distributed import check_distributable
from tests.helpers import random_tasks, reference_forward

TOL = 1e-10  # same math in another summation order: ~1e-15 apart, >= 100x margin on every path (docs/numerics.md)
REPO = Path(__file__).resolve().parents[1]


def model_of(kind: str = "mlp", norm: str = "none", seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    return meta.build_model(kind, ways=3, norm=norm, image_size=8, generator=generator).double()


def batches(seed: int, count: int = 2) -> list[tuple[torch.Tensor, ...]]:
    """``count`` task batches of 3 tasks, 3-way 2-shot, 8x8 images, float64."""
    return [random_tasks(tasks=3, ways=3, shots=2, queries=2, size=8, seed=seed + i) for i in range(count)]


def reference_persistent_reptile(model, task_batches, lr, steps, batch_size, beta1, beta2, eps, meta_lr):
    """Reptile with one Adam state for every task, in order, written out: TF's AdamOptimizer (epsilon-hat,
    ``lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t)``, ``t`` counting every inner step so far), the loss summed over
    each mini-batch (``minimize`` of the per-example loss), mini-batch ``i`` = support examples ``i*b + j``
    (mod n), then ``theta += meta_lr * (mean(phi) - theta)``. Returns the weights and the final ``(m, v, t)``."""
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    m = {k: torch.zeros_like(v) for k, v in theta.items()}
    v = {k: torch.zeros_like(p) for k, p in theta.items()}
    t = 0
    for sx_all, sy_all, _, _ in task_batches:
        adapted = []
        for sx, sy in zip(sx_all, sy_all):
            phi = dict(theta)
            for i in range(steps):
                rows = [(i * batch_size + j) % len(sx) for j in range(batch_size)]
                leaves = {k: p.clone().requires_grad_(True) for k, p in phi.items()}
                loss = F.cross_entropy(functional_call(model, leaves, (sx[rows],)), sy[rows], reduction="sum")
                grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
                t += 1
                lr_t = lr * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)
                for k, g in grads.items():
                    m[k] = beta1 * m[k] + (1 - beta1) * g
                    v[k] = beta2 * v[k] + (1 - beta2) * g * g
                    phi[k] = phi[k] - lr_t * m[k] / (v[k].sqrt() + eps)
            adapted.append(phi)
        theta = {k: theta[k] + meta_lr * (torch.stack([a[k] for a in adapted]).mean(0) - theta[k]) for k in theta}
    return theta, (m, v, t)


def train(learner: meta.MetaLearner, task_batches, meta_lr: float, driver: str = "loop") -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(learner.parameters(), lr=meta_lr)
    for tasks in task_batches:
        learner.train_step(optimizer, tasks, driver=driver)
    return {k: v.detach() for k, v in learner.model.named_parameters()}


ADAM = {"lr": 0.01, "beta1": 0.5, "beta2": 0.999, "eps": 1e-3}  # a large eps: epsilon-hat's placement shows


def persistent_learner(model, persistent: bool = True, **adam) -> meta.MetaLearner:
    rule = rules.adam(**{**ADAM, **adam}, epsilon_hat=True)
    return Reptile(model, rule, 4, persistent_state=persistent, inner_batch_size=4, inner_loss_reduction="sum")


def test_persistent_adam_on_the_loop_driver_is_one_adam_state_carried_over_every_task_in_order():
    model, task_batches = model_of(), batches(seed=0, count=3)
    expected, (m, v, t) = reference_persistent_reptile(model, task_batches, steps=4, batch_size=4, meta_lr=0.7,
                                                       **ADAM)
    learner = persistent_learner(model_of())
    assert relative_error(train(learner, task_batches, meta_lr=0.7), expected) < TOL
    state = learner.outer.state
    assert state.count == t == 3 * 3 * 4  # every inner step of every task of every meta-iteration
    assert relative_error(state.m, m) < TOL and relative_error(state.v, v) < TOL
    # a fresh state per task (the default) is another algorithm: it moves the weights elsewhere
    restarted = train(persistent_learner(model_of(), persistent=False), task_batches, meta_lr=0.7)
    assert relative_error(restarted, expected) > 1e-3


def test_epsilon_hat_adds_eps_before_the_bias_correction():
    model, tasks = model_of(), batches(seed=5, count=1)[0]
    params = {k: v.detach() for k, v in model.named_parameters()}
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    g = dict(zip(leaves, torch.autograd.grad(F.cross_entropy(functional_call(model, leaves, (tasks[0][0],)),
                                                             tasks[1][0]), list(leaves.values()))))
    lr, eps, beta2 = 0.01, 1e-3, 0.999
    for epsilon_hat, eps_seen in ((False, eps), (True, eps / (1 - beta2) ** 0.5)):  # first step: lr g / (|g| + e)
        learner = meta.MetaLearner(model, rules.adam(lr=lr, beta1=0.0, eps=eps, epsilon_hat=epsilon_hat), 1)
        adapted = learner.meta_gradient(tasks, driver="loop").adapted
        expected = {k: p - lr * g[k] / (g[k].abs() + eps_seen) for k, p in params.items()}
        assert relative_error({k: a[0] for k, a in adapted.items()}, expected) < TOL


def test_evaluation_starts_every_task_from_the_carried_state_and_leaves_it_unchanged():
    model, task_batches = model_of(), batches(seed=10, count=2)
    learner = persistent_learner(model)
    train(learner, task_batches[:1], meta_lr=0.7)
    carried = learner.outer.state
    loss, _ = learner.evaluate(task_batches[1], inner_steps=3)
    assert learner.outer.state is carried  # evaluation restores the optimizer state (reptile.py L114, L122)
    fresh = Reptile(model, learner.rule, 4, inner_batch_size=4, inner_loss_reduction="sum")
    fresh.load_state_dict({k: v for k, v in learner.state_dict().items() if not k.startswith("outer.")})
    fresh_loss, _ = fresh.evaluate(task_batches[1], inner_steps=3)
    assert relative_error({"l": loss}, {"l": fresh_loss}) > 1e-6  # Adam's moments and count matter
    # each task from the carried state: one task alone gives its own row of the batch's result
    one = [t[1:2] for t in task_batches[1]]
    assert relative_error({"l": learner.evaluate(one, inner_steps=3)[0]}, {"l": loss[1:2]}) < TOL


def test_the_carried_state_is_saved_and_a_resumed_learner_continues_exactly(tmp_path):
    task_batches = batches(seed=20, count=4)
    whole = persistent_learner(model_of())
    expected = train(whole, task_batches, meta_lr=0.5)
    first = persistent_learner(model_of())
    train(first, task_batches[:2], meta_lr=0.5)
    torch.save(first.state_dict(), tmp_path / "learner.pt")
    resumed = persistent_learner(model_of(seed=1))  # other weights, no state: all of it comes from the file
    resumed.load_state_dict(torch.load(tmp_path / "learner.pt", weights_only=True))
    assert relative_error(train(resumed, task_batches[2:], meta_lr=0.5), expected) == 0
    assert resumed.outer.state.count == whole.outer.state.count
    assert relative_error(resumed.outer.state.v, whole.outer.state.v) == 0
    # without the saved state the continuation differs (the state is what the checkpoint must carry)
    stateless = persistent_learner(model_of(seed=1))
    stateless.load_state_dict({k: v for k, v in first.state_dict().items() if not k.startswith("outer.")},
                              strict=False)
    assert relative_error(train(stateless, task_batches[2:], meta_lr=0.5), expected) > 1e-6


def test_persistent_state_refuses_drivers_that_do_not_run_tasks_in_order():
    learner = persistent_learner(model_of())
    assert learner.supported_drivers() == ("loop",)
    for driver in ("vmap", "loop_threads", "auto"):
        with pytest.raises(ValueError, match=f"unknown driver '{driver}' .*in order.*set driver=loop"):
            learner.meta_gradient(batches(seed=0, count=1)[0], driver=driver)
    with pytest.raises(ValueError, match="rule 'sgd' has none"):
        Reptile(model_of(), rules.sgd(), 1, persistent_state=True)
    persistent = ["algorithm=reptile", "inner.rule=adam", "inner.persistent_state=true", "driver=loop"]
    assert load_config(persistent).inner.persistent_state
    for override, message in (
        ("driver=vmap", "only driver=loop does .*not driver=vmap.*set driver=loop"),
        ("driver=auto", "not driver=auto.*set driver=loop"),
        ("inner.rule=sgd", "inner.rule=sgd has none"),
        ("algorithm=maml", "inner.persistent_state=true applies to algorithm=reptile"),
    ):
        with pytest.raises(ConfigError, match=message) as error:
            load_config([*persistent, override])
        assert "\n" not in str(error.value)
    assert "inner.persistent_state" in check_distributable(load_config(persistent), SimpleNamespace(world=2))
    assert check_distributable(load_config([*persistent, "inner.persistent_state=false"]),
                               SimpleNamespace(world=2)) is None


def per_query_reference(params, norm_eps, tasks) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query predicted alone: the last row of the forward of cat(support, that query) (reptile.py L129-133)."""
    losses, accuracies = [], []
    for t, (sx, _, qx, qy) in enumerate(zip(*tasks)):
        p = {k: v[t] for k, v in params.items()}
        logits = torch.stack([reference_forward("conv4", "task_bn", p, torch.cat([sx, q[None]]), norm_eps)[-1]
                              for q in qx])
        losses.append(F.cross_entropy(logits, qy))
        accuracies.append((logits.argmax(-1) == qy).double().mean())
    return torch.stack(losses), torch.stack(accuracies)


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_non_transductive_predictions_are_per_query_forwards_with_the_support_set(algorithm):
    model = meta.build_model("conv4", ways=3, norm="task_bn", image_size=28,
                             generator=torch.Generator().manual_seed(3)).double()
    tasks = random_tasks(tasks=2, ways=3, shots=2, queries=3, size=28, seed=7)
    rule = meta.sgd(lr=0.3)
    learner = Reptile(model, rule, 2) if algorithm == "reptile" else meta.MetaLearner(model, rule, 2)
    # the adapted weights: adaptation uses the support set only (the query images play no part in it)
    adapted = learner.meta_gradient((tasks[0], tasks[1], torch.zeros_like(tasks[2]), tasks[3]), driver="loop").adapted
    loss, accuracy = learner.evaluate(tasks, inner_steps=2, transductive=False)
    expected_loss, expected_accuracy = per_query_reference(adapted, 1e-5, tasks)
    assert relative_error({"l": loss}, {"l": expected_loss}) < TOL
    assert torch.equal(accuracy, expected_accuracy)
    transductive, _ = learner.evaluate(tasks, inner_steps=2)
    assert relative_error({"l": transductive}, {"l": expected_loss}) > 1e-3  # the query batch's statistics differ


def test_eval_transductive_key_reaches_evaluation_and_is_refused_where_it_means_nothing():
    cfg = load_config(["preset=reptile_omniglot_5w1s", "eval.transductive=false"])
    assert not cfg.eval.transductive
    for overrides in (["model.norm=group", "model.norm_affine=gamma_beta"], ["algorithm=protonets"]):
        with pytest.raises(ConfigError, match="eval.transductive=false .*leave eval.transductive=true"):
            load_config(["eval.transductive=false", *overrides])


def test_test_batch_size_is_the_inner_mini_batch_of_test_time_adaptation():
    model, tasks = model_of(), batches(seed=30, count=1)[0]
    rule = rules.adam(lr=0.01, beta1=0.0)
    # training on the whole support set (6 examples), testing on mini-batches of 2: the test-time adaptation equals
    # a training-time adaptation on mini-batches of 2 (whose query loss is the same function of the adapted weights)
    learner = Reptile(model, rule, 3, test_batch_size=2)
    reference = Reptile(model, rule, 3, inner_batch_size=2)
    loss, _ = learner.evaluate(tasks, inner_steps=3)
    assert relative_error({"l": loss}, {"l": reference.meta_gradient(tasks, driver="loop").loss}) < TOL
    assert relative_error({"l": loss}, {"l": Reptile(model, rule, 3).evaluate(tasks, inner_steps=3)[0]}) > 1e-6
    assert relative_error({"l": Reptile(model, rule, 3, inner_batch_size=2).evaluate(tasks, inner_steps=3)[0]},
                          {"l": loss}) < TOL  # null: the training mini-batch
    cfg = load_config(["preset=reptile_omniglot_5w5s"])
    built = build_learner(cfg, torch.float64, torch.device("cpu"))
    assert (built.inner_batch_size, built.test_batch_size) == (10, 5)  # README L47: --inner-batch 10 --eval-batch 5
    with pytest.raises(ConfigError, match="inner.test_batch_size applies to the inner loops of maml"):
        load_config(["algorithm=imaml", "inner.test_batch_size=5"])


def test_reptile_presets_pin_the_codes_protocol():
    """Each knob as openai/supervised-reptile's README commands (L35-56) and code run it."""
    for shape, test_batch in (("5w1s", 5), ("5w5s", 5), ("20w1s", 10), ("20w5s", 10)):
        cfg = load_config([f"preset=reptile_omniglot_{shape}"])
        assert (cfg.inner.persistent_state, cfg.driver, cfg.inner.loss_reduction) == (True, "loop", "sum"), shape
        assert cfg.inner.options == {"beta1": 0.0, "epsilon_hat": True}, shape
        assert (cfg.inner.test_batch_size, cfg.eval.transductive, cfg.inner.test_steps) == (test_batch, True, 50)


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
def test_a_resumed_persistent_run_equals_the_uninterrupted_one(tmp_path):
    from tests.test_training import run_cli

    args = ["preset=reptile_omniglot_5w1s", "data.dataset=synthetic", "data.synthetic_classes=20",
            "train.meta_batch=2", "train.log_every=1", "train.val_every=2", "train.val_tasks=4",
            "train.checkpoint_every=2", "eval.tasks=4", "eval.batch_size=4", "inner.test_steps=3", "progress=false",
            "device=cpu", "dtype=float64", "train.iterations=4", "eval.transductive=false",
            "train.lr_schedule=constant", "train.meta_lr=0.5"]  # constant: train.iterations may change on resume

    def run(out: Path, *extra: str, script: str = "train_maml.py") -> None:
        command = [*args, f"out_dir={out}", *extra] if script == "train_maml.py" else [str(out), *extra]
        run_cli(script, *command)  # in this process: what the script runs

    full, part = tmp_path / "full", tmp_path / "part"
    run(full)
    run(part, "train.iterations=2")
    run(part, "resume=true")
    records = [[{k: v for k, v in json.loads(line).items() if k != "its_per_s"}
                for line in (out / "metrics.jsonl").read_text().splitlines()] for out in (full, part)]
    assert records[0] == records[1]
    results = [json.loads((out / "results.json").read_text())["test"] for out in (full, part)]
    assert results[0] == results[1]
    saved = torch.load(full / "checkpoint.pt", weights_only=True)["learner"]["outer._extra_state"]["state"]
    assert saved["count"] == 4 * 2 * 5  # 4 iterations x 2 tasks x 5 inner steps
    # evaluate.py restores the carried state with the weights, and applies eval.transductive: the final model's
    # test equals the training run's (non-transductive), and the transductive test of the same tasks differs
    run(full / "checkpoint.pt", "eval.transductive=false", script="evaluate.py")
    assert json.loads((full / "results_checkpoint.json").read_text())["test"] == results[0]
    run(full / "checkpoint.pt", "eval.transductive=true", script="evaluate.py")
    assert json.loads((full / "results_checkpoint.json").read_text())["test"]["loss"] != results[0]["loss"]
