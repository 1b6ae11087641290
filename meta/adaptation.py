"""The one per-task function: adapt on the support set, score on the query set."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import grad

from meta.models.functional import autograd_grads
from meta.rules.base import InnerRule, State, apply_updates
from meta.types import Params, Task

Forward = Callable[[Params, Params, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: How the inner (support) loss reduces its per-example losses: ``mean``, or ``sum_over_shots``, the sum divided
#: by the shots K, as cbfinn/maml's ``xent`` (utils.py:L56-L58 divides the per-example cross-entropy by
#: ``update_batch_size``) under ``tf.gradients`` of that vector (maml.py:L90, L101), which sums it.
#: ``sum``: the sum over the batch, as openai/supervised-reptile's ``minimize`` of the per-example loss vector
#: (models.py L27-30: ``sparse_softmax_cross_entropy_with_logits``, no mean), i.e. ``batch`` times the mean.
INNER_LOSS_REDUCTIONS = ("mean", "sum_over_shots", "sum")


def inner_loss_scale(reduction: str, ways: int, batch: int, support: int) -> float:
    """The factor that turns the mean loss over an inner batch of ``batch`` examples into ``reduction``.

    ``sum_over_shots`` is ``sum / K`` with ``K = support / ways`` shots per class, i.e. ``ways * batch /
    support`` times the mean: ``ways`` (N) on the full support set, less on an inner mini-batch."""
    if reduction == "mean":
        return 1.0
    if reduction == "sum_over_shots":
        return ways * batch / support
    if reduction == "sum":
        return float(batch)
    raise ValueError(f"unknown inner loss reduction {reduction!r}; choose one of {INNER_LOSS_REDUCTIONS}")


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
    reduction: str = "mean",
    autograd_inner: bool = False,
) -> Generator[Params, None, State]:
    """Yield all parameters after each of ``steps`` inner updates of ``rule`` on ``(x, y)``; return the rule's final
    state (the generator's return value: ``StopIteration.value``, or the value of ``yield from``).

    With ``rule.per_sample`` the rule gets per-sample gradients ``[n, *shape]``
    (``vmap(grad)`` over the samples, which nests inside a vmap over tasks). With ``batch_size``, each step
    sees only a mini-batch of the support set (:func:`support_batch`). ``reduction`` (:data:`INNER_LOSS_REDUCTIONS`)
    scales the mean support loss ``loss_fn`` by :func:`inner_loss_scale` (the ways are the logits' last
    dimension); per-sample gradients get the same factor, so that their mean, which the per-sample rules
    average, is the gradient of the reduced loss (and a clipping bound applies to the scaled gradients).
    ``autograd_inner``: inner gradients from ``torch.autograd.grad`` (``create_graph`` unless the rule is first
    order) instead of ``torch.func.grad``, the same numbers with less overhead for per-task loops differentiated by
    plain autograd (the ``loop_autograd`` driver); never under ``torch.vmap`` or ``torch.func`` transforms.
    """
    fast = {k: v for k, v in params.items() if rule.adapts(k)}
    frozen = {k: v for k, v in params.items() if k not in fast}
    support = x.shape[0]

    def support_loss(fast: Params, i: int, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
        logits = forward(rule.at_step({**frozen, **fast}, rule_params, i), buffers, x)
        loss = loss_fn(logits, y)
        return loss if reduction == "mean" else loss * inner_loss_scale(reduction, logits.shape[-1], batch, support)

    def sample_loss(fast: Params, i: int, xi: torch.Tensor, yi: torch.Tensor, batch: int) -> torch.Tensor:
        return support_loss(fast, i, xi.unsqueeze(0), yi.unsqueeze(0), batch)

    state = rule.init(fast)
    all_x, all_y = x, y
    for i in range(steps):
        x, y = support_batch(all_x, i, batch_size), support_batch(all_y, i, batch_size)
        n = x.shape[0]
        if rule.per_sample:
            grads = torch.vmap(grad(lambda f, xi, yi: sample_loss(f, i, xi, yi, n)), in_dims=(None, 0, 0))(fast, x, y)
        elif autograd_inner:
            (grads,) = autograd_grads(support_loss(fast, i, x, y, n), (fast,), create_graph=not rule.first_order)
        else:
            grads = grad(support_loss)(fast, i, x, y, n)
        updates, state = rule.update(grads, state, fast, rule_params, i)
        fast = apply_updates(fast, updates)
        yield {k: fast.get(k, v) for k, v in params.items()}
    return state


def adapt(
    forward: Forward,
    rule: InnerRule,
    params: Params,
    rule_params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    **options: Any,
) -> Params:
    """:func:`adapt_steps` run to the end (``options``: its keyword arguments): all parameters after the last
    inner update (``params`` themselves when ``steps`` is 0)."""
    adapted = params
    for adapted in adapt_steps(forward, rule, params, rule_params, buffers, x, y, steps, **options):  # noqa: B007
        pass
    return adapted


def task_loss(
    params: Params,
    rule_params: Params,
    buffers: Params,
    task: Task,
    *,
    forward: Forward,
    rule: InnerRule,
    steps: int,
    loss_fn: LossFn = F.cross_entropy,
    step_weights: torch.Tensor | None = None,
    batch_size: int | None = None,
    inner_reduction: str = "mean",
    autograd_inner: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, Params]]:
    """Query loss of one ``task`` after adapting on its support set (in mini-batches of ``batch_size``, if given).

    The inner (support) loss reduces by ``inner_reduction`` (:data:`INNER_LOSS_REDUCTIONS`); the query loss is
    always ``loss_fn``, a mean. ``autograd_inner``: see :func:`adapt_steps`.

    With ``step_weights`` (shape ``[steps]``, the multi-step loss of MAML++) the
    loss is ``sum_i step_weights[i] * query_loss(after step i)``; accuracy is
    always that after the last step. The query forward after step ``i`` sees
    ``rule.at_step(params, rule_params, i)`` (step ``0`` when ``steps == 0``).

    Returns ``(loss, (accuracy, adapted_params))`` so it can be wrapped by
    ``torch.func.grad(..., has_aux=True)``.
    """
    support_x, support_y, query_x, query_y = task
    if step_weights is not None and step_weights.shape != (steps,):
        raise ValueError(f"step_weights must have shape ({steps},), got {tuple(step_weights.shape)}")

    def query(adapted: Params, i: int) -> torch.Tensor:
        return forward(rule.at_step(adapted, rule_params, i), buffers, query_x)

    adapted, loss = params, 0.0
    for i, adapted in enumerate(
        adapt_steps(forward, rule, params, rule_params, buffers, support_x, support_y, steps, loss_fn, batch_size,
                    inner_reduction, autograd_inner)
    ):
        if step_weights is not None and i < steps - 1:
            loss = loss + step_weights[i] * loss_fn(query(adapted, i), query_y)
    logits = query(adapted, max(steps - 1, 0))
    final = loss_fn(logits, query_y)
    loss = final if step_weights is None else loss + step_weights[-1] * final
    accuracy = (logits.argmax(dim=-1) == query_y).to(logits.dtype).mean()
    return loss, (accuracy, adapted)
