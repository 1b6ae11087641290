"""The functional MAML core: drivers agree with each other, with a plain-autograd reference, and with learn2learn."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import meta
from meta.algorithms import Reptile
from meta.models import relative_error, set_conv_impl
from tests.helpers import random_tasks, reference_maml

TOL = 1e-10  # same math in another summation order: ~1e-15 apart, >= 100x margin on every path (docs/numerics.md)

MODELS = [("conv4", "task_bn"), ("conv4", "none"), ("mlp", "task_bn")]


def make_learner(kind: str, norm: str, steps: int, first_order: bool, lr: float = 0.4, seed: int = 0,
                 protocol: str = "ours", inner_batch_size: int | None = None):
    """A float64 MAML learner. ``protocol="maml_code"``: cbfinn/maml's inner loss (sum over shots), batch norm
    (beta only, eps 1e-3, not inner-adapted) and init."""
    code = protocol == "maml_code"
    model = meta.build_model(kind, ways=5, norm=norm, generator=torch.Generator().manual_seed(seed),
                             norm_affine="beta" if code else "gamma_beta", norm_eps=1e-3 if code else 1e-5,
                             init="maml" if code else "xavier").double()
    rule = meta.first_order(meta.sgd(lr=lr)) if first_order else meta.sgd(lr=lr)
    if code:
        frozen = meta.models.norm_parameters_of(model)
        rule = meta.masked(rule, lambda name: name not in frozen, label="frozen_norm")
    return meta.MetaLearner(model, rule, inner_steps=steps, inner_batch_size=inner_batch_size,
                            inner_loss_reduction="sum_over_shots" if code else "mean")


@pytest.fixture(scope="module")
def tasks():
    return random_tasks(tasks=4, ways=5, shots=1, queries=2)


@pytest.fixture(scope="module")
def mlp_tasks():
    """Two shots for second-order comparisons of the MLP with task batch norm. With one shot its norms see five
    examples per hidden unit, and a unit the ReLU passes for one of them has a variance near 0, where the norm's
    second derivative grows like 1/(var + eps): the drivers' second-order meta-gradients then differ by up to
    1.7e-11 (five steps; 3e-13 for one), no 100x margin against TOL, while ten examples per unit measure ~2e-13.
    (Conv4's norms average over five examples times every pixel and are not affected.)"""
    return random_tasks(tasks=4, ways=5, shots=2, queries=2)


#: Inner step sizes for cbfinn/maml's inner loss (summed over the shots: five times the mean at 5-way) where 0.4
#: overshoots and five steps amplify rounding: without a norm layer its init diverges (query loss 1e113; losses
#: 8e-12 apart, 12x margin against TOL); the MLP ends at query loss 2.0 (0.7 at 0.08), meta-gradients 5.5e-12 apart
#: (18x; at 0.08: 5.5e-13, but 3.7e-12 = 27x at seed offset 1, default path: still under 100x). Conv4: 0.4.
CODE_STEP_SIZES = {("conv4", "none"): 0.04, ("mlp", "task_bn"): 0.08}


@pytest.mark.parametrize("kind,norm", MODELS)
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("protocol", ["ours", "maml_code"])
def test_vmap_loop_and_reference_agree(tasks, mlp_tasks, kind, norm, steps, first_order, protocol):
    tasks = mlp_tasks if kind == "mlp" else tasks
    lr = CODE_STEP_SIZES.get((kind, norm), 0.4) if protocol == "maml_code" else 0.4
    learner = make_learner(kind, norm, steps, first_order, lr=lr, protocol=protocol)
    loop = learner.meta_gradient(tasks, driver="loop")
    runs = [("vmap", None, "native"), ("vmap", 3, "native"), ("vmap", None, "unfold"), ("auto", None, "native"),
            ("vmap_autograd", None, "native"), ("loop_autograd", None, "native"), ("loop_threads", None, "native")]
    for driver, chunk_size, conv_impl in runs:
        set_conv_impl(learner.model, conv_impl)
        vm = learner.meta_gradient(tasks, driver=driver, chunk_size=chunk_size)
        set_conv_impl(learner.model, "native")
        assert torch.allclose(vm.loss, loop.loss, rtol=TOL, atol=0)
        assert torch.equal(vm.accuracy, loop.accuracy)
        assert relative_error(vm.adapted, loop.adapted) < TOL
        assert relative_error(vm.grads, loop.grads) < TOL

    params = dict(learner.model.named_parameters())
    code = {"shots": tasks[0].shape[1] // 5, "frozen": meta.models.norm_parameters_of(learner.model), "eps": 1e-3}
    ref_loss, ref_grads, ref_adapted = reference_maml(kind, norm, params, tasks, lr, steps, first_order,
                                                      **(code if protocol == "maml_code" else {}))
    assert torch.allclose(loop.loss, ref_loss, rtol=TOL, atol=0)
    assert relative_error(loop.grads, ref_grads) < TOL
    stacked = {k: torch.stack([a[k] for a in ref_adapted]) for k in ref_adapted[0]}
    assert relative_error(loop.adapted, stacked) < TOL


@pytest.mark.parametrize("first_order", [False, True])
def test_inner_mini_batches_match_the_reference(first_order):
    tasks = random_tasks(tasks=3, ways=5, shots=2, queries=1)  # 10 support examples: batches 0-3, 4-7, 8 9 0 1
    learner = make_learner("conv4", "task_bn", steps=3, first_order=first_order, inner_batch_size=4)
    loop = learner.meta_gradient(tasks, driver="loop")
    params = dict(learner.model.named_parameters())
    ref_loss, ref_grads, _ = reference_maml("conv4", "task_bn", params, tasks, 0.4, 3, first_order, batch_size=4)
    assert torch.allclose(loop.loss, ref_loss, rtol=TOL, atol=0)
    assert relative_error(loop.grads, ref_grads) < TOL
    for driver in ("vmap", "vmap_autograd", "loop_autograd"):
        assert relative_error(learner.meta_gradient(tasks, driver=driver).grads, loop.grads) < TOL
    # the mini-batches matter, and a batch at least the support set's size is the whole set
    full = make_learner("conv4", "task_bn", steps=3, first_order=first_order).meta_gradient(tasks, driver="loop")
    assert relative_error(loop.grads, full.grads) > 1e-3
    whole = make_learner("conv4", "task_bn", steps=3, first_order=first_order, inner_batch_size=10)
    assert relative_error(whole.meta_gradient(tasks, driver="loop").grads, full.grads) == 0


def test_unfold_convolution_equals_native():
    conv = meta.models.TaskConv2d(3, 8, 3, stride=2, padding=1).double()
    x = torch.randn(4, 3, 11, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    native = conv(x)
    conv.impl = "unfold"
    assert torch.allclose(conv(x), native, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown conv impl"):
        set_conv_impl(conv, "winograd")


def test_first_order_differs_from_second_order(tasks):
    first = make_learner("conv4", "task_bn", 1, first_order=True).meta_gradient(tasks)
    second = make_learner("conv4", "task_bn", 1, first_order=False).meta_gradient(tasks)
    assert torch.allclose(first.loss, second.loss, rtol=1e-12)  # same forward
    assert relative_error(first.grads, second.grads) > 1e-3  # different gradient


@pytest.mark.parametrize("first_order", [False, True])
def test_matches_learn2learn(tasks, first_order):
    import learn2learn as l2l

    steps, lr = 2, 0.4
    learner = make_learner("conv4", "task_bn", steps, first_order, lr=lr)
    ours = learner.meta_gradient(tasks, driver="vmap")

    maml = l2l.algorithms.MAML(learner.model, lr=lr, first_order=first_order)
    losses = []
    for sx, sy, qx, qy in zip(*tasks):
        clone = maml.clone()
        for _ in range(steps):
            clone.adapt(F.cross_entropy(clone(sx), sy))
        losses.append(F.cross_entropy(clone(qx), qy))
    names = [n for n, _ in learner.model.named_parameters()]
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(learner.model.parameters()))
    assert torch.allclose(ours.loss, torch.stack(losses).detach(), rtol=TOL, atol=0)
    assert relative_error(ours.grads, dict(zip(names, grads))) < TOL


@pytest.mark.parametrize("driver", ["vmap", "loop", "vmap_autograd", "loop_autograd", "loop_threads", "auto"])
@pytest.mark.parametrize("steps", [1, 5])
def test_canary_conv_bias_before_batch_norm_has_zero_meta_gradient(tasks, driver, steps):
    result = make_learner("conv4", "task_bn", steps, first_order=False).meta_gradient(tasks, driver=driver)
    for i in range(4):
        bias_grad = result.grads[f"features.{i}.conv.bias"]
        assert bias_grad.abs().max() < 1e-12
    # and the rest of the meta-gradient is far from zero
    assert result.grads["features.0.conv.weight"].abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["conv4", "mlp"])
@pytest.mark.parametrize("protocol", ["ours", "maml_code"])
def test_task_batch_norm_fused_kernel_and_primitives_agree(tasks, mlp_tasks, kind, protocol, monkeypatch):
    """Outside vmap on a CPU, TaskBatchNorm runs PyTorch's fused kernel; forced onto its primitives it gives the
    same second-order meta-gradient (float64), and under vmap it always uses the primitives. ``maml_code``: the
    beta-only norm with eps 1e-3, not inner-adapted."""
    from meta.models import networks as norms

    tasks = mlp_tasks if kind == "mlp" else tasks
    calls = []
    fused = F.batch_norm
    monkeypatch.setattr(norms.F, "batch_norm", lambda *a, **k: calls.append(norms.under_vmap()) or fused(*a, **k))
    learner = make_learner(kind, "task_bn", steps=2, first_order=False, protocol=protocol)
    results = {}
    for use_fused in (True, False):
        monkeypatch.setattr(norms.TaskBatchNorm, "use_fused_kernel", use_fused)
        calls.clear()
        results[use_fused] = {d: learner.meta_gradient(tasks, driver=d) for d in ("loop", "loop_autograd", "vmap")}
        assert (len(calls) > 0) == use_fused and not any(calls)  # fused only when asked, never under vmap
    for driver in ("loop", "loop_autograd", "vmap"):
        # another summation order, as a driver's: TOL (1e-12 saw 9.8e-13 on AVX2; TOL: >= 92x, paths and seeds)
        assert relative_error(results[True][driver].grads, results[False][driver].grads) < TOL, driver
    assert relative_error(results[True]["loop"].grads, results[True]["vmap"].grads) < TOL


def test_learnable_lr_gets_the_right_meta_gradient(mlp_tasks):
    tasks = mlp_tasks
    model = meta.build_model("mlp", ways=5, norm="task_bn", generator=torch.Generator().manual_seed(0)).double()
    learner = meta.MetaLearner(model, meta.sgd(lr=0.3, learnable=True), inner_steps=2)
    vm = learner.meta_gradient(tasks, driver="vmap")
    loop = learner.meta_gradient(tasks, driver="loop")
    assert relative_error(vm.rule_grads, loop.rule_grads) < TOL
    # central finite difference of the mean query loss in the learning rate
    eps = 1e-6
    with torch.no_grad():
        lr = learner.rule_params["lr"]
        lr += eps
        up = learner.meta_gradient(tasks, driver="loop").loss.mean()
        lr -= 2 * eps
        down = learner.meta_gradient(tasks, driver="loop").loss.mean()
        lr += eps
    # the difference quotient is off by ~eps^2 * f''' / 6 (truncation) + u / eps (rounding), ~1e-10 here
    assert vm.rule_grads["lr"].item() == pytest.approx((up - down).item() / (2 * eps), abs=1e-6)


@pytest.mark.parametrize("driver", ["vmap", "vmap_autograd", "auto"])
def test_fused_batch_norm_is_refused_in_second_order_vmap(tasks, driver):
    model = meta.build_model("conv4", ways=5, norm="none", generator=torch.Generator().manual_seed(0)).double()
    model.features[2].norm = nn.BatchNorm2d(64).double()
    learner = meta.MetaLearner(model, meta.sgd(lr=0.4), inner_steps=1)
    with pytest.raises(meta.FusedNormError, match=r"features\.2\.norm \(BatchNorm2d\).*TaskBatchNorm"):
        learner.meta_gradient(tasks, driver=driver)


def test_write_grads_and_adam_step(tasks):
    learner = make_learner("conv4", "task_bn", 1, first_order=False)
    before = {k: v.detach().clone() for k, v in learner.named_parameters()}
    result = learner.meta_gradient(tasks)
    learner.write_grads(result)
    torch.optim.Adam(learner.parameters(), lr=1e-3).step()
    moved = [k for k, v in learner.named_parameters() if not torch.equal(v, before[k])]
    assert "model.head.weight" in moved and "model.features.0.conv.weight" in moved


def test_evaluate_matches_meta_gradient_forward(tasks):
    learner = make_learner("conv4", "task_bn", 3, first_order=False)
    loss, accuracy = learner.evaluate(tasks, inner_steps=3)
    result = learner.meta_gradient(tasks, driver="loop")
    assert torch.allclose(loss, result.loss, rtol=1e-12)
    assert torch.equal(accuracy, result.accuracy)


def test_task_tensors_of_the_wrong_shape_are_named(tasks):
    sx, sy, qx, qy = tasks
    learner = make_learner("mlp", "task_bn", steps=1, first_order=False)
    reptile = Reptile(learner.model, meta.sgd(), inner_steps=1)
    cases = [((sx, sy[:, :1], qx, qy), "task tensors disagree"), ((sx, sy, qx[:2], qy[:2]), "task tensors disagree"),
             ((sx, sy.double(), qx, qy), "support_y must be integer class labels"),
             ((sx[0], sy[0], qx[0], qy[0]), "leading task dimension"), ((sx, sy, qx), "got 3 tensors")]
    for bad, message in cases:
        for call in (lambda b: learner.meta_gradient(b, driver="loop"), learner.evaluate, reptile.meta_gradient):
            with pytest.raises(ValueError, match=message):
                call(bad)


def test_bad_driver_and_steps():
    with pytest.raises(ValueError, match="inner_steps"):
        meta.MetaLearner(meta.build_model("mlp", 5), meta.sgd(), inner_steps=-1)
    learner = meta.MetaLearner(meta.build_model("mlp", 5), meta.sgd(), inner_steps=1)
    with pytest.raises(ValueError, match="unknown driver"):
        learner.meta_gradient(random_tasks(2, 5, 1, 1, dtype=torch.float32), driver="threads")
    with pytest.raises(ValueError, match="unknown model"):
        meta.build_model("resnet", 5)
    with pytest.raises(ValueError, match="unknown norm"):
        meta.build_model("conv4", 5, norm="layer")


def test_auto_driver_caches_its_choice_and_respects_chunk_size(tasks):
    learner = make_learner("mlp", "task_bn", 1, first_order=False)
    first = learner.meta_gradient(tasks, driver="auto")
    assert len(learner.auto_driver.choices) == 1
    again = learner.meta_gradient(tasks, driver="auto")
    assert len(learner.auto_driver.choices) == 1  # the same setting is not timed again
    assert relative_error(first.grads, again.grads) < TOL
    learner.meta_gradient(tasks, driver="auto", chunk_size=2)
    assert len(learner.auto_driver.choices) == 2
    chunked_choice = [v for k, v in learner.auto_driver.choices.items() if k[3] == 2][0]
    assert not chunked_choice.startswith("vmap_autograd")  # it would not bound memory


def test_auto_driver_stops_timing_candidates_far_behind(tasks, monkeypatch):
    calls = []

    def slow_loop(problem):
        calls.append(1)
        time.sleep(1.0)  # far behind the vmap driver on this tiny setting
        return meta.drivers.loop_driver(problem)

    monkeypatch.setitem(meta.drivers.DRIVERS, ("backprop", "slow_loop"), slow_loop)
    learner = make_learner("mlp", "task_bn", 1, first_order=False)
    learner.auto_driver.candidates = {"cpu": ("vmap", "slow_loop")}  # instead of AUTO_CANDIDATES["backprop"]
    learner.meta_gradient(tasks, driver="auto")
    assert list(learner.auto_driver.choices.values()) == ["vmap"]
    assert len(calls) == 1  # its warm-up run only: not in the timed rounds


def test_adapt_is_the_learners_inner_loop(tasks):
    learner = make_learner("mlp", "task_bn", steps=2, first_order=False)
    params = {k: v.detach() for k, v in learner.model.named_parameters()}
    forward = meta.models.functional_forward(learner.model)
    adapted = meta.adapt(forward, learner.rule, params, {}, {}, tasks[0][1], tasks[1][1], 2)
    expected = learner.meta_gradient(tasks, driver="loop").adapted
    assert relative_error(adapted, {k: v[1] for k, v in expected.items()}) < TOL
    assert meta.adapt(forward, learner.rule, params, {}, {}, tasks[0][1], tasks[1][1], steps=0) is params
