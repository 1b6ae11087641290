"""The two types every layer shares: a parameter tree and a task (support and query tensors)."""

from __future__ import annotations

from typing import NamedTuple

import torch

#: name -> tensor, as ``nn.Module.named_parameters()`` gives them (model parameters, rule tensors, gradients)
Params = dict[str, torch.Tensor]


class Task(NamedTuple):
    """One task's tensors, or a batch of tasks with a leading task dimension (``[tasks, examples, ...]``).

    A named tuple is a pytree, so ``torch.vmap(fn, in_dims=(..., 0))`` maps over the task dimension of all four.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Task:
        """The same tensors on ``device``."""
        return Task(*(t.to(device, non_blocking=non_blocking) for t in self))

    @property
    def num_tasks(self) -> int:
        """The size of the leading task dimension (of a batch)."""
        return len(self.support_x)

    def select(self, index: int | torch.Tensor) -> Task:
        """Task ``index`` of a batch (an int), or the sub-batch of the tasks at ``index`` (an index tensor)."""
        return Task(*(t[index] for t in self))


def as_task_batch(tasks: Task | tuple[torch.Tensor, ...]) -> Task:
    """``tasks`` as a :class:`Task` batch, after checking it is ``(support_x, support_y, query_x, query_y)`` with a
    leading task dimension, ``[tasks, examples, ...]`` images and ``[tasks, examples]`` integer labels (no device
    sync)."""
    tasks = tuple(tasks)
    if len(tasks) != 4:
        raise ValueError(f"tasks must be (support_x, support_y, query_x, query_y), got {len(tasks)} tensors")
    sx, sy, qx, qy = tasks
    for name, labels in (("support_y", sy), ("query_y", qy)):
        if labels.dim() != 2 or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"{name} must be integer class labels shaped [tasks, examples], got {labels.dtype} "
                             f"{tuple(labels.shape)} (one task needs a leading task dimension of 1)")
    if sx.shape[:2] != sy.shape or qx.shape[:2] != qy.shape or sx.shape[0] != qx.shape[0]:
        raise ValueError(f"task tensors disagree: support_x {tuple(sx.shape)}, support_y {tuple(sy.shape)}, "
                         f"query_x {tuple(qx.shape)}, query_y {tuple(qy.shape)}; expected [tasks, examples, ...] "
                         f"images with [tasks, examples] labels and the same number of tasks in all four")
    return Task(*tasks)
