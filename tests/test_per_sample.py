"""Per-sample gradients: vmap(grad) against a for-loop, and their mean against the batch gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import meta
from meta.models import relative_error


@pytest.mark.parametrize("kind,norm", [("conv4", "none"), ("conv4_maxpool", "group"), ("mlp", "none")])
def test_per_sample_grads_equal_loop_and_average_to_batch_gradient(kind, norm):
    model = meta.build_model(kind, ways=10, norm=norm, generator=torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    vectorized = meta.per_sample_grads(model, x, y)
    looped = meta.per_sample_grads_loop(model, x, y)
    assert next(iter(vectorized.values())).shape[0] == 8
    assert relative_error(vectorized, looped) < 1e-10
    names, tensors = zip(*model.named_parameters())
    batch = dict(zip(names, torch.autograd.grad(F.cross_entropy(model(x), y), tensors)))
    assert relative_error({k: v.mean(0) for k, v in vectorized.items()}, batch) < 1e-10
    chunked = meta.per_sample_grads(model, x, y, chunk_size=3)
    assert relative_error(chunked, looped) < 1e-10


def test_batch_statistics_are_refused():
    model = meta.build_model("conv4", ways=5, norm="task_bn")
    with pytest.raises(ValueError, match="batch statistics"):
        meta.per_sample_grads(model, torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
