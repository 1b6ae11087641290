"""SGD with momentum: the complete example of docs/rules.md (keep the two in sync; a test checks it)."""

from __future__ import annotations

import torch

from meta.rules.base import InnerRule, Params, State, register_rule


@register_rule("momentum")
def momentum(lr: float = 0.4, beta: float = 0.9, learnable: bool = True) -> InnerRule:
    """Heavy-ball SGD: ``v = beta * v + g; p = p - lr * v``, with a meta-learned ``lr`` if ``learnable``."""

    def init_rule_params(params: Params) -> Params:
        dtype = next(iter(params.values())).dtype
        return {"lr": torch.tensor(lr, dtype=dtype)} if learnable else {}

    def init(params: Params) -> State:
        return {k: torch.zeros_like(p) for k, p in params.items()}  # one velocity per task

    def step(params: Params, grads: Params, state: State, rule_params: Params, i: int):
        alpha = rule_params.get("lr", lr)
        velocity = {k: beta * state[k] + grads[k] for k in params}
        return {k: p - alpha * velocity[k] for k, p in params.items()}, velocity

    return InnerRule(name="momentum", step=step, init=init, init_rule_params=init_rule_params)
