"""Meta-SGD (Li et al. 2017): a learnable learning-rate tensor for every parameter, one inner step."""

from __future__ import annotations

import torch

from meta.rules import base
from meta.rules.base import InnerRule, Params, State, register_rule


@register_rule("metasgd")
def metasgd(lr: float = 0.4, first_order: bool = False) -> InnerRule:
    """``p - alpha_p * g`` with ``alpha_p`` a meta-learned tensor shaped like ``p``, initialized to ``lr``."""

    def init_rule_params(params: Params) -> Params:
        return {k: torch.full_like(p, lr) for k, p in params.items()}

    def step(params: Params, grads: Params, state: State, rule_params: Params, i: int):
        return {k: p - rule_params[k] * grads[k] for k, p in params.items()}, state

    rule = InnerRule(name="metasgd", step=step, init_rule_params=init_rule_params)
    return base.first_order(rule) if first_order else rule
