"""Evaluation on a fixed set of test tasks, with 95% confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from meta.data import TaskSampler, evaluation_tasks
from meta.learner import MetaLearner, as_task_batch, per_query_logits
from meta.models.networks import detached, functional_forward
from meta.rules import InnerRule
from meta.types import Params, Task

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


@torch.no_grad()
def query_logits(
    learner: MetaLearner,
    tasks: Task | tuple[torch.Tensor, ...],
    inner_steps: int | None = None,
    rule: InnerRule | None = None,
    chunk_size: int | None = None,
    transductive: bool = True,
) -> torch.Tensor:
    """Query logits ``[tasks, queries, ways]`` after the learner's own test-time adaptation (its strategy's
    ``eval_fn``, as :meth:`MetaLearner.evaluate` runs it): the forward pass that gives its accuracy, returned.
    ``transductive`` False: each query from the support set plus that query alone (:func:`per_query_logits`)."""
    steps = learner.inner_steps if inner_steps is None else inner_steps
    rule = learner.rule if rule is None else rule
    if rule is None:
        raise ValueError(f"{learner.outer.name} adapts no parameters, so its query logits are not those of adapted "
                         f"parameters; an ensemble needs a learner with an inner loop")
    task_fn, forward = learner.outer.eval_fn(learner, rule, steps), functional_forward(learner.model)

    def logits(params: Params, rule_params: Params, buffers: Params, task: Task) -> torch.Tensor:
        _, (_, adapted) = task_fn(params, rule_params, buffers, task)
        weights = rule.at_step(adapted, rule_params, max(steps - 1, 0))
        if not transductive:
            return per_query_logits(forward, weights, buffers, task.support_x, task.query_x)
        return forward(weights, buffers, task.query_x)

    state = [detached(tree) for tree in learner.functional_state()]
    return torch.vmap(logits, in_dims=(None, None, None, 0), chunk_size=chunk_size)(*state, as_task_batch(tasks))


def ensemble_evaluate(
    learners: Sequence[MetaLearner],
    tasks: Task | tuple[torch.Tensor, ...],
    inner_steps: int | None = None,
    rule: InnerRule | None = None,
    chunk_size: int | None = None,
    transductive: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query loss and accuracy of an ensemble, as MAML++'s code combines its top models
    (experiment_builder.py L282-287): every member adapts on the support set as usual, the members' query logits
    are averaged, and the argmax of the mean is the prediction. The loss is the cross-entropy of the mean logits."""
    tasks = as_task_batch(tasks)
    mean = torch.stack([query_logits(m, tasks, inner_steps, rule, chunk_size, transductive)
                        for m in learners]).mean(dim=0)
    query_y = tasks[3]
    loss = F.cross_entropy(mean.flatten(0, 1), query_y.flatten(), reduction="none").view_as(query_y).mean(dim=-1)
    accuracy = (mean.argmax(dim=-1) == query_y).to(mean.dtype).mean(dim=-1)
    return loss, accuracy


def evaluate_learner(
    learner: MetaLearner | Sequence[MetaLearner],
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
    A sequence of learners is evaluated as their ensemble (:func:`ensemble_evaluate`): the accuracies and the CI
    are those of the ensemble's predictions, task by task.

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
        if isinstance(learner, MetaLearner):
            loss, accuracy = learner.evaluate(tasks, inner_steps=inner_steps, rule=rule, chunk_size=chunk_size,
                                              transductive=transductive)
        else:
            loss, accuracy = ensemble_evaluate(learner, tasks, inner_steps=inner_steps, rule=rule,
                                               chunk_size=chunk_size, transductive=transductive)
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
