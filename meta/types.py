"""The types every layer shares: a parameter tree, a task (support and query tensors), a functional forward
and a loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

#: name -> tensor, as ``nn.Module.named_parameters()`` gives them (model parameters, rule tensors, gradients)
Params = dict[str, torch.Tensor]
#: ``forward(params, buffers, x) -> logits``: a model called functionally (:func:`meta.models.functional_forward`)
Forward = Callable[[Params, Params, torch.Tensor], torch.Tensor]
#: ``loss_fn(logits, labels) -> scalar`` (``F.cross_entropy`` by default)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Task(NamedTuple):
    """One task's tensors, or a batch of tasks with a leading task dimension (``[tasks, examples, ...]``).

    A named tuple is a pytree, so ``torch.vmap(fn, in_dims=(..., 0))`` maps over the task dimension of all four.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Task:
        """The same tensors on ``device``."""
        return Task(*(t.to(device, non_blocking=non_blocking) for t in self))
