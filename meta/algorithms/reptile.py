"""Reptile (Nichol et al. 2018): the outer update is the mean over tasks of (adapted - initial)."""

from __future__ import annotations

from typing import Any

from torch import nn

from meta.algorithms.maml import check_adapted_head, inner_loop
from meta.drivers import Direction, TaskFn
from meta.learner import MetaLearner, OuterStrategy, Phase
from meta.rules.base import InnerRule
from meta.types import Params, Task


class ReptileDifference(OuterStrategy):
    """A task's direction is ``initial - adapted`` (no meta-differentiation), so that plain SGD with learning rate
    ``eps`` on the mean is Reptile's ``theta += eps * (mean(phi) - theta)`` (``train.optimizer=sgd``). ``loss`` and
    ``accuracy`` are the query ones after adaptation, for logging. The rule must have no learnable parameters
    (nothing would train them)."""

    kind = "direction"
    trains_rule_params = False
    name = "Reptile"

    def train_fn(self, learner: MetaLearner, rule: InnerRule, phase: Phase) -> TaskFn:
        task_fn = learner.task_fn(rule=rule)

        def direction(params: Params, rule_params: Params, buffers: Params, task: Task) -> Direction:
            loss, (accuracy, adapted) = task_fn(params, rule_params, buffers, task)
            return Direction(loss, accuracy, {k: params[k] - adapted[k] for k in params}, {}, adapted)

        return direction


def Reptile(model: nn.Module, rule: InnerRule, inner_steps: int, **parts) -> MetaLearner:  # named like the algorithm
    """A :class:`MetaLearner` with the :class:`ReptileDifference` outer strategy (Adam with beta1 = 0 inside, in
    the paper)."""
    return MetaLearner(model, rule, inner_steps, outer=ReptileDifference(), **parts)


check_config = check_adapted_head


def build(cfg: Any, model: nn.Module, rule: InnerRule) -> MetaLearner:
    """``algorithm=reptile``'s learner."""
    return Reptile(model, rule, cfg.inner.steps, **inner_loop(cfg))
