"""iMAML as its official code computes it (aravindr93/imaml_dev @6a2a669): ``imaml.formulation=code`` against a
hand-written float64 transcription of that code's math, the damped CG operator against a direct linear solve,
``train.adam_eps``, the presets' knobs, and one-line errors for bad ``imaml.*`` values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import meta
from meta.algorithms import IMAML, conjugate_gradient, pullback_adapt
from meta.models import relative_error
from meta.training.builders import build_learner, build_optimizer
from meta.training.config import ConfigError, load_config
from tests.helpers import random_tasks
from tests.test_rules import TOL, assert_same

LR, LAM, REGU_COEF, LAM_DAMPING = 0.3, 2.0, 1.0, 10.0  # the official command's lam 2.0, --cg_damping 1.0, 10
IMAML_PRESETS = [f"imaml_omniglot_{cell}" for cell in ("5w1s", "5w5s", "20w1s", "20w5s")]


@pytest.fixture(scope="module")
def tiny():
    """A 3-way, 4x4-pixel problem small enough for a full Hessian: a float64 MLP with a smooth non-linearity
    (weights from an explicit generator) and three tasks."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    tasks = random_tasks(tasks=3, ways=3, shots=2, queries=2, size=4)
    return model.double(), tasks


def official_cg_solve(f_ax, b: torch.Tensor, cg_iters: int, residual_tol: float = 1e-10) -> torch.Tensor:
    """implicit_maml/utils.py L45-98 ``cg_solve`` with ``x_init=None``, transcribed (verbose and callback left out)."""
    x = torch.zeros_like(b)
    r = b - f_ax(x)
    p = r.clone()
    for _ in range(cg_iters):
        rdotr = r.dot(r)
        ap = f_ax(p)
        alpha = rdotr / p.dot(ap)
        x = x + alpha * p
        r = r - alpha * ap
        newrdotr = r.dot(r)
        beta = newrdotr / rdotr
        p = r + beta * p
        if newrdotr < residual_tol:
            break
    return x


class Flat:
    """The official code's view of a model: one flat parameter vector (``get_params``/``set_params``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.names = model, [k for k, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]

    def theta(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = shape.numel()
            out[name] = w[offset:offset + n].view(shape)
            offset += n
        return out

    def loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.model, self.params(w), (x,)), y)  # nn.CrossEntropyLoss()

    def grad(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = w.detach().requires_grad_(True)
        return torch.autograd.grad(self.loss(w, x, y), w)[0]


def official_task(flat: Flat, task, steps: int, lam: float, lr: float = LR) -> torch.Tensor:
    """omniglot_implicit_maml.py L104-112 / measure_accuracy.py L72-79: ``learn_task`` (``steps`` of
    ``torch.optim.SGD(lr)`` on the support loss alone), then one SGD step on ``regularization_loss(w_k, lam)``."""
    sx, sy, _, _ = task
    theta = flat.theta()
    w = theta.clone()
    for _ in range(steps):
        w = w - lr * flat.grad(w, sx, sy)
    return w - lr * lam * (w - theta)  # the gradient of 0.5 * lam * |w - w_k|^2


def official_direction(flat: Flat, task, w: torch.Tensor, cg_steps: int | None) -> torch.Tensor:
    """L117-125: the query-loss gradient at the adapted ``w``, then CG on ``matrix_evaluator(task, lam, 1.0)``
    (learner_model.py L143-153: ``(1 + regu_coef) v + Hv / (lam + lam_damping)``, Hv of the support loss);
    ``cg_steps=None``: the exact solution, by a direct solve with the full Hessian."""
    sx, sy, qx, qy = task
    b = flat.grad(w, qx, qy)
    hessian = torch.autograd.functional.hessian(lambda v: flat.loss(v, sx, sy), w.detach())
    operator = (1.0 + REGU_COEF) * torch.eye(len(w), dtype=w.dtype) + hessian / (LAM + LAM_DAMPING)
    if cg_steps is None:
        return torch.linalg.solve(operator, b)
    if cg_steps <= 1:
        return b
    return official_cg_solve(lambda v: operator @ v, b, cg_steps)


def code_learner(model: torch.nn.Module, steps: int, cg_steps: int, **kwargs) -> meta.MetaLearner:
    options = {"lam": LAM, "formulation": "code", "regu_coef": REGU_COEF, "lam_damping": LAM_DAMPING, **kwargs}
    return IMAML(model, meta.sgd(lr=LR), steps, cg_steps=cg_steps, **options)


def per_task(tasks, i: int):
    return tuple(t[i] for t in tasks)


@pytest.mark.parametrize("driver", ["vmap", "loop", "auto"])
def test_code_formulation_equals_a_direct_solve_of_the_codes_operator(tiny, driver):
    model, tasks = tiny
    flat = Flat(model)
    n = sum(p.numel() for p in model.parameters())
    learner = code_learner(model, steps=3, cg_steps=n)  # n CG steps: the exact solution of the n x n system
    ours = learner.meta_gradient(tasks, driver=driver)
    directions, losses = [], []
    for i in range(tasks[0].shape[0]):
        task = per_task(tasks, i)
        w = official_task(flat, task, steps=3, lam=LAM)
        directions.append(official_direction(flat, task, w, cg_steps=None))
        losses.append(flat.loss(w, task[2], task[3]))
    expected = flat.params(torch.stack(directions).mean(0))  # meta_grad += task_outer_grad / task_mb_size (L127)
    assert relative_error(ours.grads, expected) < TOL
    assert relative_error({"l": ours.loss}, {"l": torch.stack(losses).detach()}) < TOL


def test_code_formulation_with_five_cg_steps_is_the_codes_cg_solve(tiny):
    model, tasks = tiny
    flat = Flat(model)
    learner = code_learner(model, steps=3, cg_steps=5, cg_tol=1e-10)  # the preset's knobs (README L12, utils.py)
    vm, loop = learner.meta_gradient(tasks, driver="vmap"), learner.meta_gradient(tasks, driver="loop")
    assert_same(vm, loop)
    expected = []
    for i in range(tasks[0].shape[0]):
        task = per_task(tasks, i)
        expected.append(official_direction(flat, task, official_task(flat, task, 3, LAM), cg_steps=5))
    assert relative_error(vm.grads, flat.params(torch.stack(expected).mean(0))) < TOL
    exact = code_learner(model, steps=3, cg_steps=sum(p.numel() for p in model.parameters())).meta_gradient(tasks)
    assert relative_error(vm.grads, exact.grads) > 1e-6  # five steps are not the exact solve: the test can tell


def test_code_formulation_with_one_cg_step_is_the_query_gradient(tiny):
    model, tasks = tiny
    flat = Flat(model)
    ours = code_learner(model, steps=2, cg_steps=1).meta_gradient(tasks, driver="vmap")
    expected = [flat.grad(official_task(flat, per_task(tasks, i), 2, LAM), *per_task(tasks, i)[2:])
                for i in range(tasks[0].shape[0])]
    assert relative_error(ours.grads, flat.params(torch.stack(expected).mean(0))) < TOL


def test_code_formulation_differs_from_the_papers(tiny):
    model, tasks = tiny
    code = code_learner(model, steps=3, cg_steps=5).meta_gradient(tasks)
    paper = IMAML(model, meta.sgd(lr=LR), 3, lam=LAM, cg_steps=5).meta_gradient(tasks)
    same_operator = IMAML(model, meta.sgd(lr=LR), 3, lam=LAM, cg_steps=5, regu_coef=REGU_COEF,
                          lam_damping=LAM_DAMPING).meta_gradient(tasks)
    assert relative_error(code.grads, paper.grads) > 1e-3
    assert relative_error(code.grads, same_operator.grads) > 1e-3  # the inner loops differ too
    # the paper formulation with both damping terms 0 is the operator v + Hv/lam of before (bit for bit)
    default = IMAML(model, meta.sgd(lr=LR), 3, lam=LAM, cg_steps=5, regu_coef=0.0, lam_damping=0.0)
    assert torch.equal(default.meta_gradient(tasks).grads["1.weight"], paper.grads["1.weight"])


@pytest.mark.parametrize("test_lam", [0.0, 0.7])
def test_code_formulation_evaluates_as_measure_accuracy_py(tiny, test_lam):
    model, tasks = tiny
    flat = Flat(model)
    learner = code_learner(model, steps=2, cg_steps=3, test_lam=test_lam)
    loss, accuracy = learner.evaluate(tasks, inner_steps=4)
    for i in range(tasks[0].shape[0]):
        task = per_task(tasks, i)
        w = official_task(flat, task, steps=4, lam=test_lam)
        logits = functional_call(model, flat.params(w), (task[2],))
        assert abs(loss[i] - F.cross_entropy(logits, task[3])) < 1e-12
        assert accuracy[i] == (logits.argmax(-1) == task[3]).double().mean()
    if test_lam == 0.0:  # --lam 0.0: the pull-back is a zero step, so this is plain adaptation (as paper's lam 0)
        plain = meta.MetaLearner(model, meta.sgd(lr=LR), 4).evaluate(tasks)[0]
        assert relative_error({"l": loss}, {"l": plain}) < TOL


def test_pullback_adapt_is_support_descent_then_one_step_toward_theta():
    theta = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    target = torch.tensor([3.0, 0.5], dtype=torch.float64)
    phi = pullback_adapt(lambda p: 0.5 * ((p["w"] - target) ** 2).sum(), meta.sgd(lr=0.5), theta, {}, 2.0, steps=1)
    halfway = theta["w"] + 0.5 * (target - theta["w"])  # one SGD step of 0.5 on the support loss
    assert torch.allclose(phi["w"], halfway - 0.5 * 2.0 * (halfway - theta["w"]))  # lr * lam = 1: back to theta
    assert torch.allclose(phi["w"], theta["w"])


def test_conjugate_gradient_stops_where_the_official_cg_solve_breaks():
    g = torch.Generator().manual_seed(0)
    n = 10
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.logspace(0, 1.5, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(a, b)
    for tol in (1.0, 1e-2):  # r.r falls below these after the 4th and the 7th of the 10 steps
        expected = official_cg_solve(lambda v: a @ v, b, n, residual_tol=tol)
        ours = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=n, tol=tol)["x"]
        # x's entries are O(1) and CG's rounding is absolute (~u * cond(a) * |x| = 4e-15), so an entry near 0 is
        # held to atol: at 1e-14 that left a 50x margin, at 1e-12 >= 500x on every kernel path
        assert torch.allclose(ours, expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(ours, exact, rtol=1e-3)  # it did stop early
    full = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=n)["x"]  # tol 0: every step
    assert torch.allclose(full, exact, rtol=1e-9)


def test_adam_eps_reaches_the_outer_optimizer():
    cfg = load_config(["algorithm=imaml", "inner.steps=1", "data.dataset=synthetic", "train.adam_eps=0.001"])
    learner = build_learner(cfg, torch.float64, torch.device("cpu"))
    assert build_optimizer(cfg, learner).param_groups[0]["eps"] == 1e-3
    default = load_config([])
    assert build_optimizer(default, build_learner(default, torch.float32, torch.device("cpu"))).defaults["eps"] == 1e-8
    for preset in IMAML_PRESETS:
        assert load_config([f"preset={preset}"]).train.adam_eps == 1e-3  # learner_model.py L17


@pytest.mark.parametrize("preset", IMAML_PRESETS)
def test_imaml_presets_run_the_official_codes_formulation(preset):
    cfg = load_config([f"preset={preset}"])
    assert (cfg.imaml.formulation, cfg.imaml.regu_coef, cfg.imaml.lam_damping, cfg.imaml.cg_tol) == (
        "code", 1.0, 10.0, 1e-10)
    assert (cfg.imaml.lam, cfg.imaml.cg_steps, cfg.imaml.test_lam, cfg.inner.lr) == (2.0, 5, 0.0, 0.1)
    learner = build_learner(cfg, torch.float32, torch.device("cpu"))
    outer = learner.outer
    assert (outer.formulation, outer.regu_coef, outer.lam_damping, outer.cg_tol, outer.test_lam) == (
        "code", 1.0, 10.0, 1e-10, 0.0)


def test_defaults_keep_the_papers_formulation():
    cfg = load_config(["algorithm=imaml"])
    assert (cfg.imaml.formulation, cfg.imaml.regu_coef, cfg.imaml.lam_damping, cfg.imaml.cg_tol) == (
        "paper", 0.0, 0.0, 0.0)
    assert cfg.train.adam_eps == 1e-8


@pytest.mark.parametrize(("overrides", "key"), [
    (["imaml.formulation=official"], "imaml.formulation"),
    (["imaml.cg_steps=0"], "imaml.cg_steps"),
    (["imaml.lam=-1.0"], "imaml.lam"),
    (["imaml.test_lam=-0.5"], "imaml.test_lam"),
    (["imaml.regu_coef=-1.0"], "imaml.regu_coef"),
    (["imaml.lam_damping=-10.0"], "imaml.lam_damping"),
    (["imaml.cg_tol=-1e-10"], "imaml.cg_tol"),
    (["imaml.lam=0.0"], "imaml.lam"),
    (["imaml.lam=nan"], "imaml.lam"),
    (["train.adam_eps=0.0"], "train.adam_eps"),
    (["train.adam_eps=0.001", "train.optimizer=sgd"], "train.adam_eps"),
])
def test_bad_values_are_one_line_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config(["algorithm=imaml", *overrides])
    assert key in str(error.value) and "\n" not in str(error.value)


def test_lam_zero_is_allowed_with_damping():
    cfg = load_config(["algorithm=imaml", "imaml.lam=0.0", "imaml.lam_damping=10.0"])
    assert cfg.imaml.lam == 0.0


def official_conv_network(out_dim: int) -> torch.nn.Sequential:
    """implicit_maml/learner_model.py L190-220 ``make_conv_network(1, out_dim)`` for Omniglot, transcribed."""
    layers: list[torch.nn.Module] = []
    for i in range(4):
        if i == 2:
            layers.append(torch.nn.ZeroPad2d((0, 1, 0, 1)))  # L210, before conv3
        layers += [torch.nn.Conv2d(1 if i == 0 else 64, 64, 3, stride=2, padding=1),
                   torch.nn.BatchNorm2d(64, track_running_stats=False), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(2 * 2 * 64, out_dim))


def test_imaml_presets_model_is_the_official_network_with_its_init():
    cfg = load_config(["preset=imaml_omniglot_5w1s"])
    ours = build_learner(cfg, torch.float64, torch.device("cpu")).model
    official = official_conv_network(5).double()
    ours_params = [p for _, p in ours.named_parameters()]
    official_params = [p for _, p in official.named_parameters()]  # the same order: conv, BN per block, then head
    assert [p.shape for p in ours_params] == [p.shape for p in official_params]
    with torch.no_grad():
        for mine, theirs in zip(ours_params, official_params):
            theirs.copy_(mine)
    x = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert relative_error({"y": ours(x)}, {"y": official(x)}) < 1e-12  # ZeroPad2d is a no-op at 28 pixels
    # the init of L222-228: xavier_uniform_(gain=1.73) for conv and linear weights, uniform_(0, 0.05) biases
    for name, p in ours.named_parameters():
        if name.endswith("conv.weight") or name == "head.weight":
            fan_in, fan_out = p[0].numel(), p.shape[0] * p[0, 0].numel()
            bound = 1.73 * (6.0 / (fan_in + fan_out)) ** 0.5
            assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
        elif name.endswith("conv.bias") or name == "head.bias":
            assert p.min() >= 0.0 and p.max() <= 0.05 and p.std() > 0
        else:  # BatchNorm2d's own init
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))


# ---- the fixed pool of training tasks (examples/README.md L9, L14; omniglot_implicit_maml.py L98) --------------


def rotated_pool():
    import dataclasses

    from meta.data import synthetic_pool

    return dataclasses.replace(synthetic_pool(12, 6, image_size=8, seed=0), rotations=(0, 90, 180, 270))


def test_task_pool_draws_only_its_tasks_with_fresh_rotations_and_orders():
    from meta.data import TaskSampler

    pooled = TaskSampler(rotated_pool(), 3, 1, 2, task_pool=5, task_pool_seed=7)
    assert pooled.pool_classes.shape == (5, 3) and pooled.pool_drawings.shape == (5, 3, 3)
    definitions = {(tuple(c.tolist()), tuple(d.flatten().tolist()))
                   for c, d in zip(pooled.pool_classes, pooled.pool_drawings)}
    idx = pooled.sample_indices(400, torch.Generator().manual_seed(0))
    drawn = [(tuple(c.tolist()), tuple(d.flatten().tolist())) for c, d in zip(idx.classes, idx.drawings)]
    assert set(drawn) == definitions  # every task is a pool task, and 400 picks reach all 5
    first = [i for i, task in enumerate(drawn) if task == drawn[0]]
    assert len({tuple(idx.rotations[i].tolist()) for i in first}) > 1  # rotations redrawn on every use
    assert len({tuple(idx.support_order[i].tolist()) for i in first}) > 1 or pooled.ways * pooled.shots == 1
    # the pool is a function of its seed only, and the caller's generator picks from it
    again = TaskSampler(rotated_pool(), 3, 1, 2, task_pool=5, task_pool_seed=7)
    assert torch.equal(again.pool_classes, pooled.pool_classes)
    assert not torch.equal(TaskSampler(rotated_pool(), 3, 1, 2, task_pool=5, task_pool_seed=8).pool_drawings,
                           pooled.pool_drawings)
    a, b = (s.sample(4, torch.Generator().manual_seed(1)) for s in (pooled, again))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # and the fresh sampler's task stream is unchanged by the refactoring it shares
    plain = TaskSampler(rotated_pool(), 3, 1, 2).sample_indices(50, torch.Generator().manual_seed(0))
    assert len({tuple(c.tolist()) for c in plain.classes}) > 5


def test_data_task_pool_builds_a_pooled_training_sampler_only():
    from meta.training.builders import build_samplers

    cfg = load_config(["data.dataset=synthetic", "data.task_pool=20", "data.task_pool_seed=3"])
    samplers = build_samplers(cfg, torch.device("cpu"))
    assert samplers["train"].task_pool == 20 and samplers["train"].pool_classes.shape[0] == 20
    assert samplers["val"].task_pool is None and samplers["test"].task_pool is None
    assert build_samplers(load_config(["data.dataset=synthetic"]), torch.device("cpu"))["train"].task_pool is None
    for preset in IMAML_PRESETS:  # examples/README.md L9, L14: at least 200,000 tasks
        assert load_config([f"preset={preset}"]).data.task_pool == 200000
    with pytest.raises(ConfigError, match="data.task_pool") as error:
        load_config(["data.task_pool=0"])
    assert "\n" not in str(error.value)
