"""Plain gradient descent, the MAML inner loop."""

from __future__ import annotations

import torch

from meta.rules import base
from meta.rules.base import InnerRule, Params, State, register_rule


@register_rule("sgd")
def sgd(lr: float = 0.4, learnable: bool = False, first_order: bool = False) -> InnerRule:
    """MAML's inner SGD: ``p - lr * g``. ``learnable=True`` makes the one step size a meta-parameter;
    ``first_order=True`` detaches the inner gradients."""

    def init_rule_params(params: Params) -> Params:
        if not learnable:
            return {}
        dtype = next(iter(params.values())).dtype
        return {"lr": torch.tensor(float(lr), dtype=dtype)}

    def step(params: Params, grads: Params, state: State, rule_params: Params, i: int):
        alpha = rule_params.get("lr", lr)
        return {k: p - alpha * grads[k] for k, p in params.items()}, state

    rule = InnerRule(name="sgd", step=step, init_rule_params=init_rule_params)
    return base.first_order(rule) if first_order else rule
