"""Every registered inner rule under both drivers, and an independent check per rule where one exists."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import meta
from meta import rules
from meta.models import global_norm, relative_error
from meta.rules import RULES, masked, norm_parameter_names
from meta.rules.metacurvature import precondition
from tests.helpers import random_tasks

#: float64 drivers differ only by summation order, so their results agree to ~1e-15 of the global norm; 1e-10
#: leaves >= 100x margin on every comparison here and every CPU kernel path (experiments/benchmarks/cpu-tolerances)
TOL = 1e-10
UNIT_ROUNDOFF = float(torch.finfo(torch.float64).eps) / 2
REPO = Path(__file__).resolve().parents[1]


def small_model(norm: str = "group", kind: str = "mlp", size: int = 8, seed: int = 0) -> torch.nn.Module:
    """A float64 model drawn from an explicit generator (MLP on size x size images, or a strided Conv4)."""
    g = torch.Generator().manual_seed(seed)
    return meta.build_model(kind, ways=5, norm=norm, image_size=size, generator=g).double()


@pytest.fixture(scope="module")
def tasks():
    return random_tasks(tasks=3, ways=5, shots=2, queries=2, size=8)


def perturb_rule_params(learner: meta.MetaLearner, seed: int = 1) -> None:
    """Move the rule's learnable tensors off their (often symmetric) initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.rule_params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def assert_same(a: meta.TaskBatchResult, b: meta.TaskBatchResult, rule_grads: bool = True, tol: float = TOL) -> None:
    assert relative_error({"loss": a.loss}, {"loss": b.loss}) < tol
    assert torch.equal(a.accuracy, b.accuracy)
    assert relative_error(a.grads, b.grads) < tol
    if rule_grads:
        assert a.rule_grads.keys() == b.rule_grads.keys()
        if a.rule_grads:
            assert relative_error(a.rule_grads, b.rule_grads) < tol


def assert_drivers_agree(learner: meta.MetaLearner, tasks, tol: float = TOL) -> meta.TaskBatchResult:
    """vmap, the autograd drivers and the threaded loop give the loop driver's results within ``tol``; returns
    vmap's result."""
    loop = learner.meta_gradient(tasks, driver="loop")
    vm = learner.meta_gradient(tasks, driver="vmap")
    assert_same(vm, loop, tol=tol)
    assert relative_error(vm.adapted, loop.adapted) < tol
    for driver in ("vmap_autograd", "loop_autograd", "loop_threads"):  # autograd inner gradients, threads
        other = learner.meta_gradient(tasks, driver=driver)
        assert_same(other, loop, tol=tol)
        assert relative_error(other.adapted, loop.adapted) < tol
    return vm


#: Constructor arguments that keep a rule's meta-gradient well-conditioned in the driver-equivalence test, so that
#: TOL measures the drivers and not the rule's amplification of rounding. Adam's step lr * m / (sqrt(v) + eps) is,
#: on its first step, lr * g / (|g| + eps) per entry: its slope in g is lr * eps / (|g| + eps)^2, up to lr / eps at
#: g = 0, and the meta-gradient differentiates through that slope. The drivers' rounding differences in g (about
#: u * max|g|, from the kernels' summation orders) therefore come back multiplied by up to max|g| / eps, relative to
#: a unit step: at the default eps = 1e-8, with entries of g near 1e-8 (nearly dead ReLU units) next to entries of
#: 0.3, that is ~3e7, and vmap and loop measured 1.0e-10 and 1.7e-10 apart (AVX2 kernels, seeds 0 and 2), no margin
#: at all against TOL. eps = 1e-2, the scale of the gradient entries, bounds the factor by ~30 and the same
#: comparisons measure ~1e-14 on every kernel path; the default eps is tested at its own conditioning below.
WELL_CONDITIONED = {"adam": {"eps": 1e-2}}


#: every registered rule, and again with a meta-learned step size where its factory has that option
RULE_CASES = [(name, learnable) for name in sorted(RULES) for learnable in (False, True)
              if not learnable or "learnable" in inspect.signature(RULES[name]).parameters]


@pytest.mark.parametrize(("name", "learnable"), RULE_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum_over_shots"])
def test_every_registered_rule_agrees_under_vmap_and_loop(name, reduction, learnable, tasks):
    """Registering a rule is enough to get this test: loss, meta-gradient and rule-parameter gradient, with the
    mean inner loss and cbfinn/maml's sum over shots, and with a meta-learned step size where the rule has one."""
    rule = RULES[name](**WELL_CONDITIONED.get(name, {}), **({"learnable": True} if learnable else {}))
    learner = meta.MetaLearner(small_model(), rule, inner_steps=2, inner_loss_reduction=reduction)
    if learnable:  # the step size by 10% (an absolute 0.01 would flip the sign of Adam's 1e-3)
        with torch.no_grad():
            learner.rule_params["lr"].mul_(1.1)
    else:
        perturb_rule_params(learner)
    vm = assert_drivers_agree(learner, tasks)
    assert set(vm.rule_grads) == {k.replace("__", ".") for k in learner.rule_params}
    assert float(global_norm(vm.grads)) > 1e-8
    if vm.rule_grads:  # the rule's own parameters really are trained
        assert float(global_norm(vm.rule_grads)) > 1e-8


@pytest.mark.parametrize("reduction", ["mean", "sum_over_shots"])
def test_adam_at_its_default_eps_agrees_within_its_condition(reduction, tasks):
    """At the default eps = 1e-8 the drivers agree as far as the rule's condition allows (see WELL_CONDITIONED): one
    rounding unit of the largest inner-gradient entry, amplified by Adam's steepest slope 1/eps, is
    u * max|g| / eps relative to a unit step; 10 of those cover the two steps and the terms of the meta-gradient.
    Measured worst (every kernel path, seed 0): 1/330 of that tolerance (1.0e-10, the AVX2 kernels)."""
    model = small_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = F.cross_entropy if reduction == "mean" else lambda z, y: F.cross_entropy(z, y, reduction="sum") / 2
    inner = [grad(lambda p: loss(functional_call(model, p, (sx,)), sy))(params) for sx, sy in zip(*tasks[:2])]
    condition = max(float(g.abs().max()) for task in inner for g in task.values()) / 1e-8
    learner = meta.MetaLearner(model, rules.adam(eps=1e-8), inner_steps=2, inner_loss_reduction=reduction)
    assert_drivers_agree(learner, tasks, tol=10 * UNIT_ROUNDOFF * condition)


def test_registry_factories_follow_one_convention_and_names_are_unique():
    """Every factory builds a rule with no arguments, takes no ``first_order`` (that is the wrapper's), defaults
    ``learnable`` to False where it has it, and its rule's state is a typed NamedTuple."""
    params = dict(small_model().named_parameters())
    for name, factory in RULES.items():
        rule = factory()
        assert isinstance(rule, meta.InnerRule), name
        arguments = inspect.signature(factory).parameters
        assert "first_order" not in arguments, name
        assert all(a.default is not inspect.Parameter.empty for a in arguments.values()), name
        if "learnable" in arguments:
            assert arguments["learnable"].default is False and not rule.init_rule_params(params), name
            assert set(factory(learnable=True).init_rule_params(params)) == {"lr"}, name
        state = rule.init({k: v.detach() for k, v in params.items() if rule.adapts(k)})
        assert isinstance(state, tuple) and hasattr(type(state), "_fields"), name
    with pytest.raises(ValueError, match="already registered"):
        meta.register_rule("sgd")(meta.sgd)


def test_a_new_rule_is_one_file_found_by_the_registry(tmp_path, monkeypatch, tasks):
    """The docs' example, saved under a new name as a new module of meta.rules and nothing else, is registered by
    importing the package's modules and passes the driver equivalence test like every registered rule."""
    source = (REPO / "meta" / "rules" / "momentum.py").read_text()
    (tmp_path / "heavy_ball_copy.py").write_text(source.replace('register_rule("momentum")',
                                                                'register_rule("heavy_ball_copy")'))
    monkeypatch.setattr(rules, "__path__", [*rules.__path__, str(tmp_path)])
    monkeypatch.setattr(rules.base, "RULES", dict(RULES))  # the decorator registers into this copy
    monkeypatch.delitem(sys.modules, "meta.rules.heavy_ball_copy", raising=False)
    assert "heavy_ball_copy" in rules.discover()
    new = rules.base.RULES["heavy_ball_copy"]
    assert "heavy_ball_copy" not in RULES  # the real registry is untouched
    learner = meta.MetaLearner(small_model(), new(lr=0.3, learnable=True), inner_steps=2)
    perturb_rule_params(learner)
    loop = learner.meta_gradient(tasks, driver="loop")
    for driver in ("vmap", "vmap_autograd", "loop_autograd", "loop_threads"):
        assert_same(learner.meta_gradient(tasks, driver=driver), loop)
    assert set(loop.rule_grads) == {"lr"} and float(loop.rule_grads["lr"].abs()) > 1e-8


def test_chain_feeds_updates_to_the_next_rule(tasks):
    """``chain(clip_per_sample, sgd)`` is the clipped rule; a chain of two half-step SGDs is one SGD step of
    a quarter of the rate (each takes the previous updates as its gradients), and shared tensor names are
    refused."""
    model = small_model(norm="group")
    clipped = meta.MetaLearner(model, rules.clipped_sgd(lr=0.3, clip=0.05), inner_steps=2).meta_gradient(tasks)
    chained = meta.chain(rules.clip_per_sample(0.05), meta.sgd(lr=0.3))
    assert_same(meta.MetaLearner(model, chained, inner_steps=2).meta_gradient(tasks), clipped)
    halves = meta.chain(meta.sgd(lr=-0.5), meta.sgd(lr=0.6))  # updates: -0.6 * (0.5 * g) = -0.3 * g
    sgd = meta.MetaLearner(model, meta.sgd(lr=0.3), inner_steps=2).meta_gradient(tasks)
    assert_same(meta.MetaLearner(model, halves, inner_steps=2).meta_gradient(tasks), sgd)
    with pytest.raises(ValueError, match="share learnable tensor names"):
        meta.MetaLearner(model, meta.chain(meta.sgd(learnable=True), meta.sgd(learnable=True)), inner_steps=1)
    with pytest.raises(ValueError, match="only the first rule of a chain"):
        meta.chain(meta.sgd(), rules.clip_per_sample())


def test_docs_example_is_the_registered_momentum_rule():
    doc = (REPO / "docs" / "rules.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    source = (REPO / "meta" / "rules" / "momentum.py").read_text()
    assert source in blocks
    assert 20 <= len(source.strip().splitlines()) <= 30
    # the doc's recipe for a new rule names no second file to edit
    assert "__init__.py" not in doc.split("## A new rule is one file")[1].split("## Use it")[0]


def test_metasgd_with_equal_rates_is_maml(tasks):
    model = small_model(norm="task_bn")
    for steps in (1, 2):
        ours = meta.MetaLearner(model, rules.metasgd(lr=0.3), inner_steps=steps).meta_gradient(tasks)
        maml = meta.MetaLearner(model, meta.sgd(lr=0.3, learnable=True), inner_steps=steps).meta_gradient(tasks)
        assert_same(ours, maml, rule_grads=False)
        # d loss / d (one shared alpha) is the sum of d loss / d alpha over every entry
        total = sum(g.sum() for g in ours.rule_grads.values())
        assert relative_error({"lr": total}, {"lr": maml.rule_grads["lr"]}) < TOL


def test_anil_leaves_the_body_untouched(tasks):
    model = small_model(norm="task_bn")
    result = meta.MetaLearner(model, rules.anil(lr=0.4), inner_steps=2).meta_gradient(tasks, driver="vmap")
    for name, p in model.named_parameters():
        moved = (result.adapted[name] - p.detach()).abs().amax()
        if name.startswith("head."):
            assert moved > 1e-6, name
        else:
            assert moved == 0, name
    # and the body still gets a meta-gradient through the head's adaptation
    assert result.grads["features.1.weight"].abs().max() > 1e-8


def test_masked_rule_matches_hand_written_head_only_maml(tasks):
    model = small_model(norm="task_bn")
    result = meta.MetaLearner(model, rules.anil(lr=0.4), inner_steps=1).meta_gradient(tasks, driver="loop")
    params = {k: v.detach() for k, v in model.named_parameters()}

    def mean_loss(params):
        losses = []
        for sx, sy, qx, qy in zip(*tasks):
            support = F.cross_entropy(functional_call(model, params, (sx,)), sy)
            head = {k: v for k, v in params.items() if k.startswith("head.")}
            g = torch.autograd.grad(support, list(head.values()), create_graph=True)
            fast = {**params, **{k: v - 0.4 * gk for (k, v), gk in zip(head.items(), g)}}
            losses.append(F.cross_entropy(functional_call(model, fast, (qx,)), qy))
        return torch.stack(losses).mean()

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    expected = dict(zip(leaves, torch.autograd.grad(mean_loss(leaves), list(leaves.values()))))
    assert relative_error(result.grads, expected) < TOL


def test_mamlpp_rule_with_switches_off_or_neutral_is_maml(tasks):
    model = small_model(norm="task_bn")
    maml = meta.MetaLearner(model, meta.sgd(lr=0.3, learnable=True), inner_steps=3).meta_gradient(tasks)
    off = meta.MetaLearner(model, rules.mamlpp(lr=0.3, steps=3, lslr=False, per_step_bn=False), inner_steps=3)
    assert_same(off.meta_gradient(tasks), maml, rule_grads=False)
    # LSLR with every rate equal: same loss and gradient; the rates' gradients sum to the shared rate's
    lslr = meta.MetaLearner(model, rules.mamlpp(lr=0.3, steps=3, per_step_bn=False), inner_steps=3).meta_gradient(tasks)
    assert_same(lslr, maml, rule_grads=False)
    total = sum(g.sum() for g in lslr.rule_grads.values())
    assert relative_error({"lr": total}, {"lr": maml.rule_grads["lr"]}) < 1e-9


def test_mamlpp_per_step_bn_is_maml_with_frozen_norms_at_initialization(tasks):
    model = small_model(norm="task_bn")
    norms = norm_parameter_names(dict(model.named_parameters()))
    assert norms == {f"features.{i}.{w}" for i in (2, 5, 8, 11) for w in ("weight", "bias")}
    frozen = masked(meta.sgd(lr=0.3), lambda name: name not in norms)
    expected = meta.MetaLearner(model, frozen, inner_steps=3).meta_gradient(tasks)
    ours = meta.MetaLearner(model, rules.mamlpp(lr=0.3, steps=3, lslr=False), inner_steps=3).meta_gradient(tasks)
    assert relative_error({"l": ours.loss}, {"l": expected.loss}) < TOL
    rest = [k for k in expected.grads if k not in norms]
    assert relative_error({k: ours.grads[k] for k in rest}, {k: expected.grads[k] for k in rest}) < TOL
    # the model's own norm parameters are replaced; the per-step copies take their gradient, summed over steps
    assert all(float(ours.grads[k].abs().max()) == 0 for k in norms)
    per_step = {k: ours.rule_grads[f"bn.{k}"].sum(dim=0) for k in norms}
    assert relative_error(per_step, {k: expected.grads[k] for k in norms}) < TOL


def test_metacurvature_with_identity_is_maml():
    conv_tasks = random_tasks(tasks=2, ways=5, shots=1, queries=2, size=14)
    model = small_model(norm="task_bn", kind="conv4", size=14)
    learner = meta.MetaLearner(model, rules.metacurvature(lr=0.4), inner_steps=2)
    assert learner.rule_params["features__0__conv__weight__filter"].shape == (9, 9)
    ours = learner.meta_gradient(conv_tasks)
    maml = meta.MetaLearner(model, meta.sgd(lr=0.4), inner_steps=2).meta_gradient(conv_tasks)
    assert_same(ours, maml, rule_grads=False)


def test_metacurvature_preconditioner_is_the_kronecker_product():
    g = torch.Generator().manual_seed(0)
    grad4 = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    m = {"out": torch.randn(4, 4, generator=g, dtype=torch.float64),
         "in": torch.randn(3, 3, generator=g, dtype=torch.float64),
         "filter": torch.randn(4, 4, generator=g, dtype=torch.float64)}
    kron = torch.kron(torch.kron(m["out"], m["in"]), m["filter"])  # row-major vec of [out, in, kh*kw]
    expected = (kron @ grad4.flatten()).reshape(grad4.shape)
    assert torch.allclose(precondition(grad4, m), expected, rtol=1e-12, atol=1e-12)
    grad2 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    expected2 = (torch.kron(m["out"], m["in"]) @ grad2.flatten()).reshape(4, 3)
    assert torch.allclose(precondition(grad2, m), expected2, rtol=1e-12, atol=1e-12)


def test_clipped_sgd_with_huge_bound_is_sgd(tasks):
    model = small_model(norm="group")
    ours = meta.MetaLearner(model, rules.clipped_sgd(lr=0.3, clip=1e12), inner_steps=2).meta_gradient(tasks)
    sgd = meta.MetaLearner(model, meta.sgd(lr=0.3), inner_steps=2).meta_gradient(tasks)
    assert_same(ours, sgd)
    assert relative_error(ours.adapted, sgd.adapted) < TOL


def test_clipped_sgd_step_matches_per_sample_autograd(tasks):
    model, clip, lr = small_model(norm="group"), 0.05, 0.3
    result = meta.MetaLearner(model, rules.clipped_sgd(lr=lr, clip=clip), inner_steps=1).meta_gradient(tasks)
    sx, sy = tasks[0][0], tasks[1][0]
    rows = meta.per_sample_grads_loop(model, sx, sy)  # plain autograd, one sample at a time
    norms = torch.sqrt(sum(r.flatten(1).pow(2).sum(1) for r in rows.values()))
    assert (norms > clip).all()  # the bound is active for every sample
    for name, p in model.named_parameters():
        clipped = (rows[name] * (clip / norms).view(-1, *[1] * p.dim())).mean(0)
        assert torch.allclose(result.adapted[name][0], p.detach() - lr * clipped, rtol=1e-10, atol=1e-13)


def test_clipped_sgd_refuses_batch_statistics():
    with pytest.raises(ValueError, match="per-sample gradients"):
        meta.MetaLearner(small_model(norm="task_bn"), rules.clipped_sgd(), inner_steps=1)


def test_momentum_and_adam_first_steps(tasks):
    model = small_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    sx, sy = tasks[0][0], tasks[1][0]
    g = grad(lambda p: F.cross_entropy(functional_call(model, p, (sx,)), sy))(params)
    adapted = meta.MetaLearner(model, rules.adam(lr=1e-3, beta1=0.0), inner_steps=1).meta_gradient(tasks).adapted
    # Adam's first step with bias correction is lr * g / (|g| + eps)
    expected = {k: p - 1e-3 * g[k] / (g[k].abs() + 1e-8) for k, p in params.items()}
    assert relative_error({k: v[0] for k, v in adapted.items()}, expected) < TOL
    adapted = meta.MetaLearner(model, rules.momentum(lr=0.2), inner_steps=1).meta_gradient(tasks).adapted
    assert relative_error({k: v[0] for k, v in adapted.items()}, {k: p - 0.2 * g[k] for k, p in params.items()}) < TOL
