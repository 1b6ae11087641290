"""MAML++ (Antoniou et al. 2019), outer-loop switches: multi-step loss (MSL) with annealed importance
weights, and derivative-order annealing. LSLR and per-step BN are the rule :func:`meta.rules.mamlpp`;
cosine annealing of the meta-lr is ``train.lr_schedule=cosine``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meta.adaptation import LossFn
from meta.learner import MetaLearner
from meta.rules.base import InnerRule, first_order


def msl_weights(steps: int, progress: float, min_fraction: float = 0.03) -> torch.Tensor:
    """MAML++'s per-step loss importance (``get_per_step_loss_importance_vector`` of the official code) at
    ``progress`` = epoch / MSL epochs in [0, 1]: uniform ``1/steps`` at 0; the non-final weights decay
    linearly to ``min_fraction/steps`` while the final one grows; they always sum to 1."""
    floor = min_fraction / steps
    weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    weights[:-1] = (weights[:-1] - progress / steps).clamp(min=floor)
    weights[-1] = min(1.0 / steps + progress * (steps - 1) / steps, 1.0 - (steps - 1) * floor)
    return weights


class MAMLPlusPlus(MetaLearner):
    """A :class:`MetaLearner` whose training loss and derivative order follow the iteration.

    * ``msl_iterations > 0``: for the first ``msl_iterations`` iterations the loss is the multi-step loss
      weighted by :func:`msl_weights` (progress = iteration / msl_iterations); afterwards the last step only.
    * ``first_order_iterations > 0``: first-order inner gradients for that many iterations, then second order.

    With both 0 (and the rule's switches off) it is exactly MAML.
    """

    def __init__(
        self,
        model: nn.Module,
        rule: InnerRule,
        inner_steps: int,
        loss_fn: LossFn = F.cross_entropy,
        msl_iterations: int = 0,
        first_order_iterations: int = 0,
    ) -> None:
        super().__init__(model, rule, inner_steps, loss_fn)
        self.base_rule = rule
        self.msl_iterations = msl_iterations
        self.first_order_iterations = first_order_iterations
        self.set_iteration(0, 1)

    def set_iteration(self, step: int, total: int) -> None:
        """Pick the multi-step weights and the derivative order for iteration ``step``."""
        annealing = step < self.first_order_iterations and not self.base_rule.first_order
        self.rule = first_order(self.base_rule) if annealing else self.base_rule
        self.step_weights = None
        if step < self.msl_iterations and self.inner_steps > 1:
            dtype = next(self.model.parameters()).dtype
            device = next(self.model.parameters()).device
            weights = msl_weights(self.inner_steps, step / self.msl_iterations)
            self.step_weights = weights.to(device=device, dtype=dtype)
