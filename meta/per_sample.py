"""Per-sample gradients over the shared model core (the PyTorch per-sample-gradients recipe)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

from meta.models.networks import FUSED_NORM_TYPES, TaskBatchNorm, buffers_of, functional_forward, parameters_of
from meta.types import LossFn, Params


def _check_no_batch_statistics(model: nn.Module) -> None:
    coupled = [n for n, m in model.named_modules() if isinstance(m, (TaskBatchNorm, *FUSED_NORM_TYPES))]
    if coupled:
        raise ValueError(
            f"per-sample gradients are undefined when batch statistics couple the samples: {coupled}. "
            "Use norm='group' or norm='none'."
        )


def per_sample_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    params: Params | None = None,
    loss_fn: LossFn = F.cross_entropy,
    chunk_size: int | None = None,
) -> Params:
    """Gradient of the loss of each sample alone: ``{name: [batch, *param.shape]}``, via ``vmap(grad)``."""
    _check_no_batch_statistics(model)
    forward = functional_forward(model)
    params = parameters_of(model) if params is None else params
    params = {k: v.detach() for k, v in params.items()}
    buffers = buffers_of(model)

    def sample_loss(params: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(forward(params, buffers, xi.unsqueeze(0)), yi.unsqueeze(0))

    return torch.vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, x, y)


def per_sample_grads_loop(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = F.cross_entropy
) -> Params:
    """Reference: one ``torch.autograd.grad`` call per sample, in a Python for-loop."""
    _check_no_batch_statistics(model)
    names, tensors = zip(*model.named_parameters())
    rows = [torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), tensors) for i in range(len(x))]
    return {name: torch.stack([row[j] for row in rows]) for j, name in enumerate(names)}
