"""The colour-image conv models (MAML's mini-ImageNet Conv4: 3 input channels, 32 filters, max-pool, an 800-feature
head at 84 pixels): their shapes, and every driver's meta-gradient equal to the loop's and to a plain-autograd
reference in float64 on that model shape."""

from __future__ import annotations

import pytest
import torch

import meta
from meta.models import build_model, relative_error, set_conv_impl
from tests.helpers import reference_maml

TOL = 1e-10  # the equivalence tolerance of tests/test_core.py (docs/numerics.md)


def colour_tasks(tasks: int, ways: int, shots: int, queries: int, size: int, channels: int = 3, seed: int = 0):
    """Random balanced float64 tasks of ``channels`` x ``size`` x ``size`` images, classes made separable."""
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    sx = torch.rand(tasks, ways * shots, channels, size, size, generator=g, dtype=torch.float64)
    qx = torch.rand(tasks, ways * queries, channels, size, size, generator=g, dtype=torch.float64)
    return sx + 0.3 * sy[..., None, None, None], sy, qx + 0.3 * qy[..., None, None, None], qy


def maml_miniimagenet_learner(filters: int, image_size: int, steps: int, first_order: bool, lr: float = 0.01):
    """cbfinn/maml's mini-ImageNet learner (configs/maml_miniimagenet_5w1s.yaml) in float64: max-pool Conv4 on 3
    channels, beta-only batch norm with eps 1e-3 kept out of the inner loop, inner loss summed over the shots."""
    model = build_model("conv4_maxpool", 5, in_channels=3, image_size=image_size, filters=filters,
                        generator=torch.Generator().manual_seed(0), norm_affine="beta", norm_eps=1e-3).double()
    frozen = meta.models.norm_parameters_of(model)
    rule = meta.masked(meta.sgd(lr=lr), lambda name: name not in frozen, label="frozen_norm")
    rule = meta.first_order(rule) if first_order else rule
    return meta.MetaLearner(model, rule, inner_steps=steps, inner_loss_reduction="sum_over_shots"), frozen


def test_maml_miniimagenet_conv4_has_the_papers_shape():
    model = build_model("conv4_maxpool", 5, in_channels=3, image_size=84, filters=32)
    assert model.head.in_features == 5 * 5 * 32  # cbfinn/maml maml.py L203: dim_hidden * 5 * 5
    assert model.features[0].conv.weight.shape == (32, 3, 3, 3)
    assert all(block.conv.weight.shape == (32, 32, 3, 3) for block in list(model.features)[1:])
    assert model(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    # 3*32*9 + 3 * 32*32*9 conv weights, 4 x 32 conv biases, 4 x (32 + 32) norm scales and shifts, 800*5 + 5 head
    assert sum(p.numel() for p in model.parameters()) == 3 * 32 * 9 + 3 * 32 * 32 * 9 + 4 * 32 + 4 * 64 + 800 * 5 + 5


def test_filters_default_keeps_the_64_filter_models():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for name in ("conv4", "conv4_maxpool"):
        default, explicit = build_model(name, 5, generator=g()), build_model(name, 5, generator=g(), filters=64)
        assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
        assert default.features[0].conv.out_channels == 64


@pytest.mark.parametrize("bad,message", [
    ({"name": "mlp", "filters": 32}, "filters=32 applies to the conv models only"),
    ({"name": "conv4", "filters": 0}, "filters must be a positive integer, got 0"),
])
def test_bad_filters_are_one_line_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        build_model(bad.pop("name"), 5, **bad)


@pytest.mark.parametrize("steps,first_order", [(1, False), (5, False), (5, True)])
def test_drivers_agree_on_the_miniimagenet_model(steps, first_order):
    """The real 84-pixel, 3-channel shape (5x5 feature maps into the head) with 4 filters to stay fast; MAML's
    five inner steps at 0.01 on the summed loss, second and first order."""
    tasks = colour_tasks(tasks=2, ways=5, shots=1, queries=2, size=84)
    learner, frozen = maml_miniimagenet_learner(filters=4, image_size=84, steps=steps, first_order=first_order)
    loop = learner.meta_gradient(tasks, driver="loop")
    runs = [("vmap", None, "native"), ("vmap", 1, "native"), ("vmap", None, "unfold"),
            ("vmap_autograd", None, "native"), ("loop_autograd", None, "native")]
    for driver, chunk_size, conv_impl in runs:
        set_conv_impl(learner.model, conv_impl)
        other = learner.meta_gradient(tasks, driver=driver, chunk_size=chunk_size)
        set_conv_impl(learner.model, "native")
        assert torch.allclose(other.loss, loop.loss, rtol=TOL, atol=0), driver
        assert torch.equal(other.accuracy, loop.accuracy)
        assert relative_error(other.adapted, loop.adapted) < TOL, driver
        assert relative_error(other.grads, loop.grads) < TOL, driver
    params = dict(learner.model.named_parameters())
    ref_loss, ref_grads, _ = reference_maml("conv4_maxpool", "task_bn", params, tasks, 0.01, steps, first_order,
                                            shots=1, frozen=frozen, eps=1e-3)
    assert torch.allclose(loop.loss, ref_loss, rtol=TOL, atol=0)
    assert relative_error(loop.grads, ref_grads) < TOL
    assert float(learner.meta_gradient(tasks, driver="loop").grads["head.weight"].abs().sum()) > 0
