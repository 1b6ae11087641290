"""Reptile (Nichol et al. 2018): the outer update is the mean over tasks of (adapted - initial)."""

from __future__ import annotations

import torch

from meta.drivers import TaskBatchResult
from meta.learner import MetaLearner, Tasks, check_tasks

IN_DIMS = (None, None, None, 0, 0, 0, 0)


class Reptile(MetaLearner):
    """Adapts each task with the inner rule (Adam with beta1 = 0 in the paper) and no meta-differentiation.

    :meth:`meta_gradient` returns ``grads = initial - mean_tasks(adapted)``, so that plain SGD with
    learning rate ``eps`` on them is Reptile's ``theta += eps * (mean(phi) - theta)`` (``train.optimizer=sgd``).
    ``loss``/``accuracy`` are the query ones after adaptation, for logging. The rule must have no
    learnable parameters (nothing would train them).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(self.rule_params):
            raise ValueError(f"Reptile cannot train the rule parameters of {self.rule.name}; use a rule without any")

    @torch.no_grad()
    def meta_gradient(self, tasks: Tasks, driver: str = "vmap", chunk_size: int | None = None) -> TaskBatchResult:
        """Adapt every task (vmapped over tasks, or a Python loop) and form the Reptile direction."""
        self._check_driver(driver, second_order=False)
        tasks = check_tasks(tasks)
        params, rule_params, buffers = self._detached_state()
        task_fn = self.task_fn()
        if driver != "loop":  # vmap (or a vectorized driver such as auto)
            loss, (accuracy, adapted) = torch.vmap(task_fn, in_dims=IN_DIMS, chunk_size=chunk_size)(
                params, rule_params, buffers, *tasks
            )
        else:
            rows = [task_fn(params, rule_params, buffers, *(t[i] for t in tasks)) for i in range(len(tasks[0]))]
            loss = torch.stack([r[0] for r in rows])
            accuracy = torch.stack([r[1][0] for r in rows])
            adapted = {k: torch.stack([r[1][1][k] for r in rows]) for k in params}
        grads = {k: params[k] - adapted[k].mean(dim=0) for k in params}
        return TaskBatchResult(loss, accuracy, grads, {}, adapted)
