"""Evaluation on a fixed set of test tasks, with 95% confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from meta.data import TaskSampler, evaluation_tasks
from meta.learner import MetaLearner, OuterStrategy, adapt_steps, as_task_batch, per_query_logits
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


def records_every_step(learner: MetaLearner | Sequence[MetaLearner], transductive: bool = True) -> bool:
    """Whether :func:`step_metrics` applies: one learner whose test-time adaptation is its plain inner loop (the
    default ``eval_fn``: the MAML family, Meta-SGD, ANIL, MAML++), evaluated transductively."""
    return (isinstance(learner, MetaLearner) and learner.rule is not None and transductive
            and type(learner.outer).eval_fn is OuterStrategy.eval_fn)


@torch.no_grad()
def step_metrics(
    learner: MetaLearner,
    tasks: Task | tuple[torch.Tensor, ...],
    inner_steps: int | None = None,
    rule: InnerRule | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query loss and accuracy after every inner step 0..``inner_steps``, ``[tasks, inner_steps + 1]``, from
    one adaptation per task: column ``s`` equals :meth:`MetaLearner.evaluate` with ``inner_steps=s``. As cbfinn/maml's
    ``test()`` (main.py) records every step's accuracy into its CSV, except its step-0 column, which is the support
    set's accuracy before adaptation (maml.py ``task_accuracya``); here every column is the query set's."""
    if not records_every_step(learner):
        raise ValueError(f"{learner.outer.name} does not adapt with its plain inner loop at test time, so its "
                         f"accuracy after each inner step is not recorded")
    steps = learner.inner_steps if inner_steps is None else inner_steps
    rule = learner.rule if rule is None else rule
    forward, loss_fn = functional_forward(learner.model), learner.loss_fn
    options = {"batch_size": learner.test_batch_size, "reduction": learner.inner_loss_reduction}

    def per_task(params: Params, rule_params: Params, buffers: Params, task: Task) -> tuple[torch.Tensor, ...]:
        support_x, support_y, query_x, query_y = task

        def measured(weights: Params) -> tuple[torch.Tensor, torch.Tensor]:
            logits = forward(weights, buffers, query_x)
            return loss_fn(logits, query_y), (logits.argmax(dim=-1) == query_y).to(logits.dtype).mean()

        adapted = adapt_steps(forward, rule, params, rule_params, buffers, support_x, support_y, steps, loss_fn,
                              **options)
        columns = [measured(rule.at_step(params, rule_params, 0))]
        columns += [measured(rule.at_step(weights, rule_params, i)) for i, weights in enumerate(adapted)]
        return torch.stack([loss for loss, _ in columns]), torch.stack([accuracy for _, accuracy in columns])

    state = [detached(tree) for tree in learner.functional_state()]
    return torch.vmap(per_task, in_dims=(None, None, None, 0), chunk_size=chunk_size)(*state, as_task_batch(tasks))


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
    per_step: bool = False,
) -> dict[str, Any]:
    """Accuracy (in percent) ± 95% CI and mean loss over the fixed task set drawn from ``seed``; with ``per_task``,
    also ``task_accuracies``: each task's accuracy in percent, in the task set's order (for paired comparisons).
    With ``per_step`` (where :func:`records_every_step`), also ``steps``: the accuracy ± CI and the loss after every
    inner step 0..``inner_steps`` (:func:`step_metrics`; its last entry is the result itself).
    A sequence of learners is evaluated as their ensemble (:func:`ensemble_evaluate`): the accuracies and the CI
    are those of the ensemble's predictions, task by task.

    With ``dist`` (several ranks), every rank draws the same task set and evaluates every ``world``-th batch of it;
    the per-task results are gathered in task order, so every rank returns what one process would, exactly.
    ``transductive`` False: each query is predicted alone with the support set (``eval.transductive``)."""
    if per_step and not records_every_step(learner, transductive):
        raise ValueError("per_step needs one learner that adapts with its plain inner loop, evaluated transductively")
    losses, accuracies = [], []
    world, rank = (1, 0) if dist is None else (dist.world, dist.rank)
    for i, batch in enumerate(evaluation_tasks(sampler, num_tasks=num_tasks, seed=seed, batch_size=batch_size)):
        if i % world != rank:  # another rank's batch (the same batches as on one process: the same numbers)
            continue
        batch = batch.to(device)
        tasks = (batch.support_x.to(dtype), batch.support_y, batch.query_x.to(dtype), batch.query_y)
        if per_step:  # [tasks, steps + 1]: every inner step's column, from one adaptation
            loss, accuracy = step_metrics(learner, tasks, inner_steps=inner_steps, rule=rule, chunk_size=chunk_size)
        elif isinstance(learner, MetaLearner):
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
    losses, accuracies = torch.cat(losses), torch.cat(accuracies).double() * 100
    steps = None
    if per_step:  # the last column is the result; each column's own CI
        steps = []
        for s in range(accuracies.shape[1]):
            mean, half_width = mean_ci95(accuracies[:, s])
            steps.append({"step": s, "accuracy": mean, "ci95": half_width, "loss": losses[:, s].mean().item()})
        losses, accuracies = losses[:, -1], accuracies[:, -1]
    per_task_accuracy = accuracies
    accuracy, ci95 = mean_ci95(per_task_accuracy)
    result = {"accuracy": accuracy, "ci95": ci95, "loss": losses.mean().item(), "tasks": num_tasks}
    if steps is not None:
        result["steps"] = steps
    if per_task:
        result["task_accuracies"] = per_task_accuracy.tolist()
    return result
