"""SGD with momentum: the complete example of docs/rules.md (keep the two in sync; a test checks it)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from meta.rules.base import InnerRule, Params, register_rule, scalar_lr


class MomentumState(NamedTuple):
    velocity: Params  # one velocity per adapted tensor, for one task


@register_rule("momentum")
def momentum(lr: float = 0.4, beta: float = 0.9, learnable: bool = False) -> InnerRule:
    """Heavy-ball SGD: ``v = beta * v + g``, update ``-lr * v``; ``lr`` is meta-learned if ``learnable``."""

    def init(params: Params) -> MomentumState:
        return MomentumState({k: torch.zeros_like(p) for k, p in params.items()})

    def update(grads: Params, state: MomentumState, params: Params, rule_params: Params, i: int):
        alpha = rule_params.get("lr", lr)
        velocity = {k: beta * state.velocity[k] + grads[k] for k in params}
        return {k: -alpha * velocity[k] for k in params}, MomentumState(velocity)

    return InnerRule(name="momentum", update=update, init=init, init_rule_params=scalar_lr(lr, learnable))
