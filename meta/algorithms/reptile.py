"""Reptile (Nichol et al. 2018): the outer update is the mean over tasks of (adapted - initial)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from meta.drivers import MAP_AUTO_CANDIDATES, MAP_DRIVERS, AutoDriver, TaskBatchResult
from meta.learner import MetaLearner, Tasks
from meta.types import Params, Task, as_task_batch


class Reptile(MetaLearner):
    """Adapts each task with the inner rule (Adam with beta1 = 0 in the paper) and no meta-differentiation.

    :meth:`meta_gradient` returns ``grads = initial - mean_tasks(adapted)``, so that plain SGD with
    learning rate ``eps`` on them is Reptile's ``theta += eps * (mean(phi) - theta)`` (``train.optimizer=sgd``).
    ``loss``/``accuracy`` are the query ones after adaptation, for logging. The rule must have no
    learnable parameters (nothing would train them). There is no meta-backward pass, so its drivers are
    :data:`meta.drivers.MAP_DRIVERS` (``vmap``, ``loop``, ``loop_threads``, and ``auto`` among them).
    """

    drivers = MAP_DRIVERS

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(self.rule_params):
            raise ValueError(f"Reptile cannot train the rule parameters of {self.rule.name}; use a rule without any")

    def _make_auto_driver(self) -> AutoDriver:
        return AutoDriver(drivers=MAP_DRIVERS, candidates=MAP_AUTO_CANDIDATES)

    def direction_fn(self) -> Callable:
        """Per-task ``(query loss, accuracy, initial - adapted, adapted)``: the task's share of the Reptile step."""
        task_fn = self.task_fn()

        def fn(params: Params, rule_params: Params, buffers: Params, task: Task):
            loss, (accuracy, adapted) = task_fn(params, rule_params, buffers, task)
            return loss, accuracy, {k: params[k] - adapted[k] for k in params}, adapted

        return fn

    @torch.no_grad()
    def meta_gradient(self, tasks: Tasks, driver: str = "vmap", chunk_size: int | None = None) -> TaskBatchResult:
        """Adapt every task on ``driver`` and form the Reptile direction ``initial - mean_tasks(adapted)``."""
        self._check_driver(driver, second_order=False)
        tasks = as_task_batch(tasks)
        params, rule_params, buffers = self._detached_state()
        run = self.auto_driver if driver == "auto" else self.drivers[driver]
        return run(self.direction_fn(), params, rule_params, buffers, tasks, chunk_size)
