"""Adam as an inner rule (Reptile's inner optimizer, with beta1 = 0 there)."""

from __future__ import annotations

import torch

from meta.rules import base
from meta.rules.base import InnerRule, Params, State, register_rule


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    # sqrt with a finite (zero) derivative at 0, for second-order meta-gradients through Adam
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))


@register_rule("adam")
def adam(
    lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, first_order: bool = False
) -> InnerRule:
    """Adam with bias correction; its moments start at zero for every task (state ``(m, v)``)."""

    def init(params: Params) -> State:
        return {k: torch.zeros_like(p) for k, p in params.items()}, {k: torch.zeros_like(p) for k, p in params.items()}

    def step(params: Params, grads: Params, state: State, rule_params: Params, i: int):
        m = {k: beta1 * state[0][k] + (1 - beta1) * g for k, g in grads.items()}
        v = {k: beta2 * state[1][k] + (1 - beta2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - beta1 ** (i + 1), 1 - beta2 ** (i + 1)
        new = {k: p - lr * (m[k] / c1) / (_safe_sqrt(v[k] / c2) + eps) for k, p in params.items()}
        return new, (m, v)

    rule = InnerRule(name="adam", step=step, init=init)
    return base.first_order(rule) if first_order else rule
