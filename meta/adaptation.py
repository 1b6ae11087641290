"""The one per-task function: adapt on the support set, score on the query set."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.func import grad

from meta.models.functional import autograd_grads
from meta.rules.base import InnerRule

Params = dict[str, torch.Tensor]
Forward = Callable[[Params, Params, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_AUTOGRAD_INNER = contextvars.ContextVar("autograd_inner_gradients", default=False)


@contextlib.contextmanager
def autograd_inner_gradients() -> Iterator[None]:
    """Inside this block, inner gradients come from ``torch.autograd.grad`` (``create_graph`` unless the rule is
    first order) instead of ``torch.func.grad``: the same numbers with less overhead, for per-task loops that are
    differentiated by plain autograd. Not for code under ``torch.vmap`` or ``torch.func`` transforms."""
    token = _AUTOGRAD_INNER.set(True)
    try:
        yield
    finally:
        _AUTOGRAD_INNER.reset(token)


def support_batch(x: torch.Tensor, step: int, batch_size: int | None) -> torch.Tensor:
    """The support examples inner step ``step`` uses: all of them (``batch_size`` None or at least their number),
    else the next ``batch_size`` in order, cycling (step ``i`` starts at ``i * batch_size`` modulo their number).
    Samplers shuffle the support set, so these are mini-batches drawn without replacement (Reptile's)."""
    n = x.shape[0]
    if batch_size is None or batch_size >= n:
        return x
    start = step * batch_size % n
    if start + batch_size <= n:
        return x[start : start + batch_size]
    return torch.cat([x[start:], x[: start + batch_size - n]])


def adapt_steps(
    forward: Forward,
    rule: InnerRule,
    params: Params,
    rule_params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    loss_fn: LossFn = F.cross_entropy,
    batch_size: int | None = None,
) -> Iterator[Params]:
    """Yield all parameters after each of ``steps`` inner updates of ``rule`` on ``(x, y)``.

    With ``rule.per_sample`` the rule gets per-sample gradients ``[n, *shape]``
    (``vmap(grad)`` over the samples, which nests inside a vmap over tasks). With ``batch_size``, each step
    sees only a mini-batch of the support set (:func:`support_batch`).
    """
    fast = {k: v for k, v in params.items() if rule.adapts(k)}
    frozen = {k: v for k, v in params.items() if k not in fast}

    def support_loss(fast: Params, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(forward(rule.at_step({**frozen, **fast}, rule_params, i), buffers, x), y)

    def sample_loss(fast: Params, i: int, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return support_loss(fast, i, xi.unsqueeze(0), yi.unsqueeze(0))

    state = rule.init(fast)
    all_x, all_y = x, y
    for i in range(steps):
        x, y = support_batch(all_x, i, batch_size), support_batch(all_y, i, batch_size)
        if rule.per_sample:
            grads = torch.vmap(grad(lambda f, xi, yi: sample_loss(f, i, xi, yi)), in_dims=(None, 0, 0))(fast, x, y)
        elif _AUTOGRAD_INNER.get():
            (grads,) = autograd_grads(support_loss(fast, i, x, y), (fast,), create_graph=not rule.first_order)
        else:
            grads = grad(support_loss)(fast, i, x, y)
        fast, state = rule.step(fast, grads, state, rule_params, i)
        yield {k: fast.get(k, v) for k, v in params.items()}


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
    batch_size: int | None = None,
) -> Params:
    """Run ``steps`` inner updates of ``rule`` on ``(x, y)``; return all parameters after adaptation."""
    adapted = params
    for after_step in adapt_steps(forward, rule, params, rule_params, buffers, x, y, steps, loss_fn, batch_size):
        adapted = after_step
    return adapted


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
    step_weights: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, Params]]:
    """Query loss of one task after adapting on its support set (in mini-batches of ``batch_size``, if given).

    With ``step_weights`` (shape ``[steps]``, the multi-step loss of MAML++) the
    loss is ``sum_i step_weights[i] * query_loss(after step i)``; accuracy is
    always that after the last step. The query forward after step ``i`` sees
    ``rule.at_step(params, rule_params, i)`` (step ``0`` when ``steps == 0``).

    Returns ``(loss, (accuracy, adapted_params))`` so it can be wrapped by
    ``torch.func.grad(..., has_aux=True)``.
    """
    if step_weights is not None and step_weights.shape != (steps,):
        raise ValueError(f"step_weights must have shape ({steps},), got {tuple(step_weights.shape)}")

    def query(adapted: Params, i: int) -> torch.Tensor:
        return forward(rule.at_step(adapted, rule_params, i), buffers, query_x)

    adapted, loss = params, 0.0
    for i, adapted in enumerate(
        adapt_steps(forward, rule, params, rule_params, buffers, support_x, support_y, steps, loss_fn, batch_size)
    ):
        if step_weights is not None and i < steps - 1:
            loss = loss + step_weights[i] * loss_fn(query(adapted, i), query_y)
    logits = query(adapted, max(steps - 1, 0))
    final = loss_fn(logits, query_y)
    loss = final if step_weights is None else loss + step_weights[-1] * final
    accuracy = (logits.argmax(dim=-1) == query_y).to(logits.dtype).mean()
    return loss, (accuracy, adapted)
