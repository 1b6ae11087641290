"""Reptile (Nichol et al. 2018): the outer update is the mean over tasks of (adapted - initial)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from meta.drivers import Direction, TaskBatchResult
from meta.learner import MetaLearner, Tasks
from meta.types import Params, Task, as_task_batch


class Reptile(MetaLearner):
    """Adapts each task with the inner rule (Adam with beta1 = 0 in the paper) and no meta-differentiation.

    :meth:`meta_gradient` returns ``grads = initial - mean_tasks(adapted)``, so that plain SGD with
    learning rate ``eps`` on them is Reptile's ``theta += eps * (mean(phi) - theta)`` (``train.optimizer=sgd``).
    ``loss``/``accuracy`` are the query ones after adaptation, for logging. The rule must have no
    learnable parameters (nothing would train them). There is no meta-backward pass, so its
    drivers are the ``direction`` row of :data:`meta.drivers.DRIVERS` (``vmap``, ``loop``, ``loop_threads``,
    and ``auto`` among them).
    """

    outer_kind = "direction"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(self.rule_params):
            raise ValueError(f"Reptile cannot train the rule parameters of {self.rule.name}; use a rule without any")

    def direction_fn(self) -> Callable:
        """Per-task ``(query loss, accuracy, initial - adapted, adapted)``: the task's share of the Reptile step."""
        task_fn = self.task_fn()

        def fn(params: Params, rule_params: Params, buffers: Params, task: Task):
            loss, (accuracy, adapted) = task_fn(params, rule_params, buffers, task)
            return Direction(loss, accuracy, {k: params[k] - adapted[k] for k in params}, {}, adapted)

        return fn

    @torch.no_grad()
    def meta_gradient(self, tasks: Tasks, driver: str = "vmap", chunk_size: int | None = None) -> TaskBatchResult:
        """Adapt every task on ``driver`` and form the Reptile direction ``initial - mean_tasks(adapted)``."""
        self._check_driver(driver, second_order=False)
        return self.run_driver(self.direction_fn(), as_task_batch(tasks), driver, chunk_size)
