"""Meta-SGD (Li et al. 2017): a learnable learning-rate tensor for every parameter, one inner step."""

from __future__ import annotations

import torch

from meta.rules.base import EmptyState, InnerRule, Params, register_rule


@register_rule("metasgd")
def metasgd(lr: float = 0.4) -> InnerRule:
    """Updates ``-alpha_p * g`` with ``alpha_p`` a meta-learned tensor shaped like ``p``, initialized to ``lr``."""

    def init_rule_params(params: Params) -> Params:
        return {k: torch.full_like(p, lr) for k, p in params.items()}

    def update(grads: Params, state: EmptyState, params: Params, rule_params: Params, i: int):
        return {k: -rule_params[k] * grads[k] for k in params}, state

    return InnerRule(name="metasgd", update=update, init_rule_params=init_rule_params)
