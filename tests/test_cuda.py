"""The same exactness checks on a CUDA device (skipped where there is none; run by scripts/gpu_checks.sh)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import meta
from meta.models import relative_error
from meta.rules import RULES
from meta.training.cuda_graph import GRAPHABLE_DRIVERS
from tests.helpers import random_tasks, reference_maml
from tests.test_rules import WELL_CONDITIONED

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOL = 1e-10  # same math in another summation order: ~1e-15 apart, >= 100x margin on every path (docs/numerics.md)
DEVICE = "cuda"
DRIVERS = ["vmap", "loop", "vmap_autograd", "loop_autograd", "auto"]


def cuda_tasks(dtype=torch.float64):
    return tuple(t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE)
                 for t in random_tasks(tasks=4, ways=5, shots=1, queries=2))  # the same draws for any dtype


@pytest.mark.parametrize("steps,first_order", [(1, False), (5, False), (1, True)])
def test_drivers_agree_with_cpu_reference_on_cuda(steps, first_order):
    model = meta.build_model("conv4", ways=5, generator=torch.Generator().manual_seed(0)).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    cpu_tasks = random_tasks(tasks=4, ways=5, shots=1, queries=2)
    ref_loss, ref_grads, _ = reference_maml("conv4", "task_bn", params, cpu_tasks, 0.4, steps, first_order)
    rule = meta.first_order(meta.sgd(lr=0.4)) if first_order else meta.sgd(lr=0.4)
    learner = meta.MetaLearner(model.to(DEVICE), rule, inner_steps=steps)
    tasks = cuda_tasks()
    for driver in DRIVERS:
        result = learner.meta_gradient(tasks, driver=driver)
        assert result.loss.device.type == DEVICE
        assert torch.allclose(result.loss.cpu(), ref_loss, rtol=TOL, atol=0), driver
        assert relative_error({k: g.cpu() for k, g in result.grads.items()}, ref_grads) < TOL, driver
    # the canary: conv biases right before a norm have a zero meta-gradient
    assert max(result.grads[f"features.{i}.conv.bias"].abs().max().item() for i in range(4)) < 1e-12


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_every_rule_vmap_matches_loop_on_cuda(rule_name):
    # no norm layer: biases right before a norm have a zero true gradient, and an inner Adam would turn their
    # rounding noise into full-size steps (the registry test in test_rules.py covers norms on the CPU); Adam at the
    # registry test's well-conditioned eps, since entries of g near eps behind the ReLUs amplify rounding by max|g|/eps
    model = meta.build_model("conv4", ways=5, norm="none", generator=torch.Generator().manual_seed(0))
    rule = RULES[rule_name](**WELL_CONDITIONED.get(rule_name, {}))
    learner = meta.MetaLearner(model, rule, inner_steps=2).double().to(DEVICE)
    tasks = cuda_tasks()
    loop = learner.meta_gradient(tasks, driver="loop")
    vm = learner.meta_gradient(tasks, driver="vmap")
    assert torch.allclose(vm.loss, loop.loss, rtol=TOL, atol=0)
    assert relative_error(vm.grads, loop.grads) < TOL
    assert relative_error(vm.adapted, loop.adapted) < TOL


def test_per_sample_grads_on_cuda():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 26 * 26, 10)).double().to(DEVICE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 28, 28, generator=g, dtype=torch.float64).to(DEVICE)
    y = torch.randint(0, 10, (6,), generator=g).to(DEVICE)
    fast = meta.per_sample_grads(net, x, y, loss_fn=F.cross_entropy)
    slow = meta.per_sample_grads_loop(net, x, y, loss_fn=F.cross_entropy)
    assert relative_error(fast, slow) < TOL


def float32_meta_gradient_error(allow_tf32: bool) -> float:
    """Relative error of a float32 second-order meta-gradient on the GPU against float64."""
    model = meta.build_model("conv4", ways=5, generator=torch.Generator().manual_seed(0))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=allow_tf32):
        learner32 = meta.MetaLearner(model.to(DEVICE), meta.sgd(lr=0.4), inner_steps=1)
        result32 = learner32.meta_gradient(cuda_tasks(torch.float32), driver="auto")
    learner64 = meta.MetaLearner(model.double(), meta.sgd(lr=0.4), inner_steps=1)
    result64 = learner64.meta_gradient(cuda_tasks(torch.float64), driver="loop")
    return relative_error({k: g.double() for k, g in result32.grads.items()}, result64.grads)


def test_float32_meta_gradient_without_tf32_is_close_to_float64():
    # ~3e-6 on the CPU; a wrong gradient lands near 1. (With cuDNN's default TF32 convolutions the error is
    # several percent: scripts/gpu_checks.sh prints both.)
    assert float32_meta_gradient_error(allow_tf32=False) < 1e-4


def float32_tasks(seed: int):
    return tuple(t.to(DEVICE) for t in random_tasks(tasks=4, ways=5, shots=1, queries=2, seed=seed,
                                                      dtype=torch.float32))


def capturable_adam(learner) -> torch.optim.Adam:
    """The optimizer a graphed run uses (meta/training/builders.py build_optimizer with train.cuda_graph)."""
    return torch.optim.Adam(learner.parameters(), lr=torch.tensor(1e-3, device=DEVICE), capturable=True)


def _eager_and_graphed(make_learner, driver: str, warmup_steps: int = 1):
    """An eager learner and a graphed one with the same optimizer implementation (capturable Adam, its lr a
    tensor): what differs is only whether the step's kernels are launched one by one or replayed from a graph.
    (Plain against capturable Adam is its own test below: the two implementations round differently, and Adam's
    first steps amplify rounding by up to max|g|/eps, docs/numerics.md.)"""
    from meta.training.cuda_graph import GraphedMetaStep

    eager, graphed_learner = make_learner(), make_learner()
    eager_opt, graphed_opt = capturable_adam(eager), capturable_adam(graphed_learner)
    return eager, eager_opt, graphed_learner, graphed_opt, GraphedMetaStep(
        graphed_learner, graphed_opt, driver=driver, warmup_steps=warmup_steps)


def test_capturable_adam_takes_plain_adams_steps():
    """A graphed run's optimizer (capturable Adam, lr tensor) against an eager run's (plain Adam): the same steps
    up to rounding. At Adam's default eps=1e-8 rounding differences are amplified by up to max|g|/eps (~1e7 for
    near-zero gradient entries, docs/numerics.md), so this compares at a well-conditioned eps=1e-2."""
    model = meta.build_model("conv4", ways=5, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    plain_learner, capturable_learner = (meta.MetaLearner(copy.deepcopy(model), meta.sgd(lr=0.4), inner_steps=1)
                                         for _ in range(2))
    plain = torch.optim.Adam(plain_learner.parameters(), lr=1e-3, eps=1e-2)
    capturable = torch.optim.Adam(capturable_learner.parameters(), lr=torch.tensor(1e-3, device=DEVICE),
                                  eps=1e-2, capturable=True)
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, benchmark=False, allow_tf32=False):
        for i in range(5):
            batch = float32_tasks(seed=i)
            a = plain_learner.train_step(plain, batch, driver="vmap")
            b = capturable_learner.train_step(capturable, batch, driver="vmap")
            assert torch.allclose(a.loss, b.loss, rtol=1e-5), i
    assert relative_error(dict(plain_learner.named_parameters()), dict(capturable_learner.named_parameters())) < 1e-5


@pytest.mark.parametrize("driver", GRAPHABLE_DRIVERS)
def test_cuda_graph_training_steps_match_eager_steps(driver):
    """Graphed steps (eager warm-up, capture, replays on new tasks, a changing learning rate) take the same
    training trajectory as eager steps."""
    model = meta.build_model("conv4", ways=5, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    batches = [float32_tasks(seed=i) for i in range(5)]
    eager, eager_opt, graphed_learner, graphed_opt, graphed = _eager_and_graphed(
        lambda: meta.MetaLearner(copy.deepcopy(model), meta.sgd(lr=0.4), inner_steps=1), driver)
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, benchmark=False, allow_tf32=False):
        for i, batch in enumerate(batches):
            lr = 1e-3 * (1 - i / 10)  # a schedule: the graphed optimizer's lr tensor is filled in place
            eager_opt.param_groups[0]["lr"] = lr
            graphed_opt.param_groups[0]["lr"].fill_(lr)
            result = eager.train_step(eager_opt, batch, driver=driver)
            loss, accuracy = graphed(batch)
            assert torch.allclose(loss, result.loss, rtol=1e-5), i
            if driver != "auto":  # two auto drivers may pick different (equally exact) strategies
                assert torch.equal(accuracy, result.accuracy), i
    assert len(graphed.graphs) == 1  # captured once, replayed on the later batches
    moved = relative_error(dict(eager.model.named_parameters()), dict(model.named_parameters()))
    assert moved > 1e-4  # five Adam steps really changed the weights
    assert relative_error(dict(graphed_learner.named_parameters()), dict(eager.named_parameters())) < 1e-5


def test_cuda_graph_follows_mamlpp_schedules():
    """MAML++'s derivative-order annealing and multi-step-loss switch change the work: each change gets its own
    graph, and the step weights (new values every iteration) reach the replayed graph."""
    from meta.algorithms import MAMLPlusPlus

    model = meta.build_model("conv4", ways=5, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    total = 7

    def make():
        learner = MAMLPlusPlus(copy.deepcopy(model), meta.build_rule("mamlpp", lr=0.4, steps=2, lslr=True),
                               inner_steps=2, msl_iterations=4, first_order_iterations=2)
        return learner.to(DEVICE)

    eager, eager_opt, graphed_learner, graphed_opt, graphed = _eager_and_graphed(make, "vmap_autograd")
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, benchmark=False, allow_tf32=False):
        for i in range(total):
            batch = float32_tasks(seed=i)
            for learner in (eager, graphed_learner):
                learner.set_iteration(i, total)
            result = eager.train_step(eager_opt, batch, driver="vmap_autograd")
            loss, _ = graphed(batch)
            assert torch.allclose(loss, result.loss, rtol=1e-5), i
    # first order + MSL (steps 0-1), second order + MSL (2-3), second order, last step only (4-6)
    assert len(graphed.graphs) == 3
    assert relative_error(dict(graphed_learner.named_parameters()), dict(eager.named_parameters())) < 1e-5
