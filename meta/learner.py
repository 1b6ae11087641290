"""``MetaLearner``: a model, an inner rule and its learnable tensors, with both drivers."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from meta.adaptation import LossFn, task_loss
from meta.drivers import VECTORIZED_DRIVERS, Driver, Problem, TaskBatchResult, drivers_of, vmap_forward
from meta.drivers.auto import AutoDriver
from meta.models.functional import buffers_of, detached, functional_forward, parameters_of
from meta.models.norms import find_fused_norms
from meta.per_sample import _check_no_batch_statistics
from meta.rules.base import InnerRule
from meta.types import Params, Task, as_task_batch

#: what ``meta_gradient`` and ``evaluate`` accept: a :class:`Task` batch, or any 4-tuple of its tensors
Tasks = Task | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class FusedNormError(ValueError):
    """A fused norm layer would give wrong second-order meta-gradients under vmap."""


def _to_key(name: str) -> str:
    if "__" in name:
        raise ValueError(f"rule parameter name {name!r} must not contain '__'")
    return name.replace(".", "__")


def _from_key(key: str) -> str:
    return key.replace("__", ".")


class MetaLearner(nn.Module):
    """Meta-learns a model's initialization together with the learnable tensors of an inner rule.

    ``learner.parameters()`` is everything the outer optimizer trains: the
    model's parameters and the rule's parameters (``learner.rule_params``).
    """

    #: how the outer strategy gets its per-task direction: its row of :data:`meta.drivers.DRIVERS`
    outer_kind: str = "backprop"
    #: drivers of that row this learner refuses, with the reason
    refused_drivers: dict[str, str] = {}

    def __init__(
        self,
        model: nn.Module,
        rule: InnerRule,
        inner_steps: int,
        loss_fn: LossFn = F.cross_entropy,
    ) -> None:
        super().__init__()
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        self.model = model
        self.rule = rule
        self.inner_steps = inner_steps
        self.loss_fn = loss_fn
        #: MAML++'s multi-step loss: query-loss weight after each inner step (None: the last step only).
        self.step_weights: torch.Tensor | None = None
        #: inner mini-batch size (Reptile): each inner step uses this many support examples (None: all of them)
        self.inner_batch_size: int | None = None
        #: how the inner (support) loss reduces: mean, or MAML's sum_over_shots (meta.adaptation.inner_loss_scale)
        self.inner_loss_reduction: str = "mean"
        if rule.per_sample:
            _check_no_batch_statistics(model)
        initial = detached(parameters_of(model))
        self.rule_params = nn.ParameterDict(
            {_to_key(k): nn.Parameter(v.clone()) for k, v in rule.init_rule_params(initial).items()}
        )
        self._fused_norms = find_fused_norms(model)
        #: the ``auto`` driver, with its cached per-setting choices
        self.auto_driver = AutoDriver()

    @classmethod
    def drivers(cls) -> dict[str, Driver]:
        """The drivers this learner runs on, by name (``auto`` chooses among them)."""
        return drivers_of(cls.outer_kind, tuple(cls.refused_drivers))

    @classmethod
    def supported_drivers(cls) -> tuple[str, ...]:
        """The driver names this learner accepts: its drivers and ``auto``."""
        return (*cls.drivers(), "auto")

    def describe(self) -> str:
        """The work one meta-gradient does, beyond the task shapes: what the ``auto`` driver keys its choice on
        (the outer kind first, which names its candidates)."""
        return (f"{self.outer_kind} {type(self).__name__} rule={self.rule.name} steps={self.inner_steps} "
                f"batch={self.inner_batch_size}")

    def run_driver(self, task_fn: Callable, tasks: Task, driver: str, chunk_size: int | None) -> TaskBatchResult:
        """``task_fn`` over ``tasks`` on ``driver`` (a name of :meth:`supported_drivers`) with this learner's
        detached state."""
        problem = Problem(task_fn, *self._detached_state(), tasks, chunk_size)
        if driver == "auto":
            return self.auto_driver(problem, self.describe(), self.drivers())
        return self.drivers()[driver](problem)

    def functional_state(self) -> tuple[Params, Params, Params]:
        """``(params, rule_params, buffers)`` as name -> tensor dicts."""
        rule_params = {_from_key(k): v for k, v in self.rule_params.items()}
        return parameters_of(self.model), rule_params, buffers_of(self.model)

    def _detached_state(self) -> tuple[Params, Params, Params]:
        # torch.func differentiates on its own; no outer autograd graph is needed.
        return tuple(detached(tree) for tree in self.functional_state())

    def task_fn(
        self, inner_steps: int | None = None, rule: InnerRule | None = None, step_weights: torch.Tensor | None = None
    ) -> Callable:
        """The per-task function with the model, rule and step count bound (defaults: this learner's)."""
        return functools.partial(
            task_loss,
            forward=functional_forward(self.model),
            rule=self.rule if rule is None else rule,
            steps=self.inner_steps if inner_steps is None else inner_steps,
            loss_fn=self.loss_fn,
            step_weights=step_weights,
            batch_size=self.inner_batch_size,
            inner_reduction=self.inner_loss_reduction,
        )

    def set_iteration(self, step: int, total: int) -> None:
        """Hook called by the training script before each meta-iteration (``step`` of ``total``, from 0),
        for per-iteration schedules such as MAML++'s. Stateless: a resumed run calls it again. No-op here."""

    def _check_driver(self, driver: str, second_order: bool) -> None:
        if driver not in self.supported_drivers():
            reason = f" ({self.refused_drivers[driver]})" if driver in self.refused_drivers else ""
            raise ValueError(f"unknown driver {driver!r} for {type(self).__name__}{reason}; choose one of "
                             f"{sorted(self.supported_drivers())}")
        if driver in VECTORIZED_DRIVERS and second_order and self._fused_norms:
            layers = ", ".join(f"{path} ({kind})" for path, kind in self._fused_norms)
            raise FusedNormError(
                f"fused norm layers give wrong second-order meta-gradients under vmap on this torch "
                f"(pytorch/functorch#534): {layers}. Use meta.models.TaskBatchNorm (norm='task_bn') or "
                f"nn.GroupNorm (norm='group') instead, or the 'loop' driver, or a first-order rule."
            )

    def meta_gradient(self, tasks: Tasks, driver: str = "vmap", chunk_size: int | None = None) -> TaskBatchResult:
        """Per-task losses/accuracies and the meta-gradient of the mean query loss for a batch of tasks.

        ``tasks`` is ``(support_x, support_y, query_x, query_y)``, each shaped ``[tasks, n*k, ...]``.
        """
        self._check_driver(driver, second_order=not self.rule.first_order and self.inner_steps > 0)
        return self.run_driver(self.task_fn(step_weights=self.step_weights), as_task_batch(tasks), driver,
                               chunk_size)

    def write_grads(self, result: TaskBatchResult) -> None:
        """Store a result's meta-gradients in ``.grad`` of the model and rule parameters (copied into the
        existing ``.grad`` tensors where there are some, so that their buffers stay put, as CUDA graphs need)."""
        grads = [(p, result.grads[name]) for name, p in self.model.named_parameters()]
        grads += [(p, result.rule_grads[_from_key(key)]) for key, p in self.rule_params.items()]
        for p, g in grads:
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.copy_(g)

    def train_step(
        self, optimizer: torch.optim.Optimizer, tasks: Tasks, driver: str = "vmap", chunk_size: int | None = None
    ) -> TaskBatchResult:
        """One outer step: :meth:`meta_gradient`, :meth:`write_grads`, then ``optimizer.step()``."""
        result = self.meta_gradient(tasks, driver=driver, chunk_size=chunk_size)
        self.write_grads(result)
        optimizer.step()
        return result

    @torch.no_grad()
    def evaluate(
        self,
        tasks: Tasks,
        inner_steps: int | None = None,
        rule: InnerRule | None = None,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task query loss and accuracy after adaptation (vmapped, no meta-gradient).

        ``inner_steps`` and ``rule`` override the training ones, e.g. MAML's 3 test-time steps.
        """
        return vmap_forward(Problem(self.task_fn(inner_steps, rule), *self._detached_state(), as_task_batch(tasks),
                                    chunk_size))
