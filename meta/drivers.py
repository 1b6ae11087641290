"""Drivers: run the per-task function over a batch of tasks.

Every driver takes ``task_fn(params, rule_params, buffers, sx, sy, qx, qy) ->
(loss, (accuracy, adapted))`` and task tensors shaped ``[tasks, n*k, ...]``, and
returns the same :class:`TaskBatchResult`. The meta-gradient is that of the
mean query loss over tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.func import grad_and_value

Params = dict[str, torch.Tensor]
TaskFn = Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, Params]]]


class TaskBatchResult(NamedTuple):
    """Per-task losses and accuracies, meta-gradients of the mean loss, and adapted parameters."""

    loss: torch.Tensor  # [tasks]
    accuracy: torch.Tensor  # [tasks]
    grads: Params  # d mean(loss) / d params
    rule_grads: Params  # d mean(loss) / d rule_params
    adapted: Params  # [tasks, ...] per-task adapted parameters


def _stack(trees: list[Params]) -> Params:
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


def _mean_over_tasks(tree: Params) -> Params:
    return {k: v.mean(dim=0) for k, v in tree.items()}


def vmap_driver(
    task_fn: TaskFn,
    params: Params,
    rule_params: Params,
    buffers: Params,
    tasks: tuple[torch.Tensor, ...],
    chunk_size: int | None = None,
) -> TaskBatchResult:
    """``torch.func.grad`` of the per-task function inside ``torch.vmap`` over tasks.

    ``chunk_size`` bounds memory: at most that many tasks are differentiated at once.
    """
    per_task = torch.vmap(
        grad_and_value(task_fn, argnums=(0, 1), has_aux=True),
        in_dims=(None, None, None, 0, 0, 0, 0),
        chunk_size=chunk_size,
    )
    (g_params, g_rule), (loss, (accuracy, adapted)) = per_task(params, rule_params, buffers, *tasks)
    return TaskBatchResult(loss, accuracy, _mean_over_tasks(g_params), _mean_over_tasks(g_rule), adapted)


def loop_driver(
    task_fn: TaskFn,
    params: Params,
    rule_params: Params,
    buffers: Params,
    tasks: tuple[torch.Tensor, ...],
    chunk_size: int | None = None,
) -> TaskBatchResult:
    """The reference: an explicit Python for-loop over tasks calling the same function."""
    per_task = grad_and_value(task_fn, argnums=(0, 1), has_aux=True)
    results = [per_task(params, rule_params, buffers, *(t[i] for t in tasks)) for i in range(len(tasks[0]))]
    g_params = _stack([r[0][0] for r in results])
    g_rule = _stack([r[0][1] for r in results])
    loss = torch.stack([r[1][0] for r in results])
    accuracy = torch.stack([r[1][1][0] for r in results])
    adapted = _stack([r[1][1][1] for r in results])
    return TaskBatchResult(loss, accuracy, _mean_over_tasks(g_params), _mean_over_tasks(g_rule), adapted)


def vmap_forward(
    task_fn: TaskFn,
    params: Params,
    rule_params: Params,
    buffers: Params,
    tasks: tuple[torch.Tensor, ...],
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query loss and accuracy without a meta-gradient (evaluation)."""
    per_task = torch.vmap(task_fn, in_dims=(None, None, None, 0, 0, 0, 0), chunk_size=chunk_size)
    loss, (accuracy, _) = per_task(params, rule_params, buffers, *tasks)
    return loss, accuracy


DRIVERS: dict[str, Callable[..., TaskBatchResult]] = {"vmap": vmap_driver, "loop": loop_driver}
