"""Evaluation on a fixed set of test tasks, with 95% confidence intervals."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from meta.data import TaskSampler, evaluation_tasks
from meta.learner import MetaLearner
from meta.rules import InnerRule

if TYPE_CHECKING:
    from meta.training.distributed import DistContext


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)`` (population std, as ``np.std`` in MAML's code)."""
    values = values.double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("no values to summarize")
    std = values.std(unbiased=False).item() if n > 1 else 0.0
    return values.mean().item(), 1.96 * std / math.sqrt(n)


def evaluate_learner(
    learner: MetaLearner,
    sampler: TaskSampler,
    *,
    num_tasks: int,
    seed: int,
    batch_size: int,
    inner_steps: int | None = None,
    rule: InnerRule | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
    per_task: bool = False,
    dist: DistContext | None = None,
    transductive: bool = True,
) -> dict[str, Any]:
    """Accuracy (in percent) ± 95% CI and mean loss over the fixed task set drawn from ``seed``; with ``per_task``,
    also ``task_accuracies``: each task's accuracy in percent, in the task set's order (for paired comparisons).

    With ``dist`` (several ranks), every rank draws the same task set and evaluates every ``world``-th batch of it;
    the per-task results are gathered in task order, so every rank returns what one process would, exactly.
    ``transductive`` False: each query is predicted alone with the support set (``eval.transductive``)."""
    losses, accuracies = [], []
    world, rank = (1, 0) if dist is None else (dist.world, dist.rank)
    for i, batch in enumerate(evaluation_tasks(sampler, num_tasks=num_tasks, seed=seed, batch_size=batch_size)):
        if i % world != rank:  # another rank's batch (the same batches as on one process: the same numbers)
            continue
        batch = batch.to(device)
        tasks = (batch.support_x.to(dtype), batch.support_y, batch.query_x.to(dtype), batch.query_y)
        loss, accuracy = learner.evaluate(tasks, inner_steps=inner_steps, rule=rule, chunk_size=chunk_size,
                                          transductive=transductive)
        losses.append(loss)
        accuracies.append(accuracy)
    if world > 1:  # batch i is rank i % world's (i // world)-th: interleave the gathered lists back into order
        parts = dist.all_gather_object([(lo.cpu(), ac.cpu()) for lo, ac in zip(losses, accuracies)])
        ordered = [parts[i % world][i // world] for i in range(sum(len(p) for p in parts))]
        losses, accuracies = [lo for lo, _ in ordered], [ac for _, ac in ordered]
    per_task_accuracy = torch.cat(accuracies).double() * 100
    accuracy, ci95 = mean_ci95(per_task_accuracy)
    result = {"accuracy": accuracy, "ci95": ci95, "loss": torch.cat(losses).mean().item(), "tasks": num_tasks}
    if per_task:
        result["task_accuracies"] = per_task_accuracy.tolist()
    return result
