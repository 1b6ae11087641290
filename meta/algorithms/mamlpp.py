"""MAML++ (Antoniou et al. 2019), outer-loop switches: multi-step loss (MSL) with annealed importance
weights, and derivative-order annealing, as a per-iteration schedule of MAML. LSLR and per-step BN are the rule
:func:`meta.rules.mamlpp`; cosine annealing of the meta-lr is ``train.lr_schedule=cosine``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meta.algorithms.maml import check_adapted_head, inner_loop
from meta.learner import MetaLearner, Phase
from meta.rules.base import InnerRule
from meta.types import LossFn


def msl_weights(steps: int, progress: float, min_fraction: float = 0.03) -> torch.Tensor:
    """MAML++'s per-step loss importance (``get_per_step_loss_importance_vector`` of the official code) at
    ``progress`` = epoch / MSL epochs in [0, 1]: uniform ``1/steps`` at 0; the non-final weights decay
    linearly to ``min_fraction/steps`` while the final one grows; they always sum to 1."""
    floor = min_fraction / steps
    weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    weights[:-1] = (weights[:-1] - progress / steps).clamp(min=floor)
    weights[-1] = min(1.0 / steps + progress * (steps - 1) / steps, 1.0 - (steps - 1) * floor)
    return weights


@dataclass(frozen=True)
class MultiStepSchedule:
    """MAML++'s phase at each iteration (a :data:`meta.learner.Schedule`).

    * ``msl_iterations > 0``: for the first ``msl_iterations`` iterations the loss is the multi-step loss weighted
      by :func:`msl_weights` (progress = iteration / msl_iterations); afterwards the last step only.
    * ``first_order_iterations > 0``: first-order inner gradients for that many iterations, then second order.
    * ``epoch_iterations`` (E): both are read at the first iteration of ``step``'s epoch, so they move once per
      epoch as in the official code: its weights use ``current_epoch = int(iter / 500)`` (few_shot_learning_system.py
      L83-103, L345-348), the multi-step loss runs while ``epoch < multi_step_loss_num_epochs`` (L232) and second
      order once ``epoch > first_order_to_second_order_epoch`` (L304-305, so ``first_order_iterations`` is
      ``(that epoch + 1) * E``). None: every iteration.
    """

    steps: int
    msl_iterations: int = 0
    first_order_iterations: int = 0
    epoch_iterations: int | None = None

    def __call__(self, step: int, total: int) -> Phase:
        """The phase of iteration ``step`` (``total`` is not used: the switches count iterations)."""
        if self.epoch_iterations is not None:
            step -= step % self.epoch_iterations
        weights = None
        if step < self.msl_iterations and self.steps > 1:
            weights = msl_weights(self.steps, step / self.msl_iterations)
        return Phase(weights, step < self.first_order_iterations)


def MAMLPlusPlus(  # builds a MetaLearner, named like the algorithm
    model: nn.Module,
    rule: InnerRule,
    inner_steps: int,
    loss_fn: LossFn = F.cross_entropy,
    msl_iterations: int = 0,
    first_order_iterations: int = 0,
    epoch_iterations: int | None = None,
    **parts,
) -> MetaLearner:
    """MAML with the :class:`MultiStepSchedule`, at iteration 0. With both switches 0 (and the rule's off) it is
    exactly MAML."""
    schedule = MultiStepSchedule(inner_steps, msl_iterations, first_order_iterations, epoch_iterations)
    learner = MetaLearner(model, rule, inner_steps, loss_fn, schedule=schedule, **parts)
    learner.set_iteration(0, 1)
    return learner


check_config = check_adapted_head


def build(cfg: Any, model: nn.Module, rule: InnerRule) -> MetaLearner:
    """``algorithm=mamlpp``'s learner."""
    return MAMLPlusPlus(model, rule, cfg.inner.steps, msl_iterations=cfg.mamlpp.msl_iterations,
                        first_order_iterations=cfg.mamlpp.first_order_iterations,
                        epoch_iterations=cfg.train.epoch_iterations, **inner_loop(cfg))
