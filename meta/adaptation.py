"""The one per-task function: adapt on the support set, score on the query set."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import grad

from meta.rules.base import InnerRule

Params = dict[str, torch.Tensor]
Forward = Callable[[Params, Params, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def adapt(
    forward: Forward,
    rule: InnerRule,
    params: Params,
    rule_params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    loss_fn: LossFn = F.cross_entropy,
) -> Params:
    """Run ``steps`` inner updates of ``rule`` on ``(x, y)``; return all parameters after adaptation."""
    fast = {k: v for k, v in params.items() if rule.adapts(k)}
    frozen = {k: v for k, v in params.items() if k not in fast}

    def support_loss(fast: Params) -> torch.Tensor:
        return loss_fn(forward({**frozen, **fast}, buffers, x), y)

    state = rule.init(fast)
    for i in range(steps):
        grads = grad(support_loss)(fast)
        fast, state = rule.step(fast, grads, state, rule_params, i)
    return {k: fast.get(k, v) for k, v in params.items()}


def task_loss(
    params: Params,
    rule_params: Params,
    buffers: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    *,
    forward: Forward,
    rule: InnerRule,
    steps: int,
    loss_fn: LossFn = F.cross_entropy,
) -> tuple[torch.Tensor, tuple[torch.Tensor, Params]]:
    """Query loss of one task after adapting on its support set.

    Returns ``(loss, (accuracy, adapted_params))`` so it can be wrapped by
    ``torch.func.grad(..., has_aux=True)``.
    """
    adapted = adapt(forward, rule, params, rule_params, buffers, support_x, support_y, steps, loss_fn)
    logits = forward(adapted, buffers, query_x)
    loss = loss_fn(logits, query_y)
    accuracy = (logits.argmax(dim=-1) == query_y).to(logits.dtype).mean()
    return loss, (accuracy, adapted)
