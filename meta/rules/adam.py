"""Adam as an inner rule (Reptile's inner optimizer, with beta1 = 0 there)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from meta.rules.base import InnerRule, Params, register_rule, scalar_lr


class AdamState(NamedTuple):
    m: Params  # first moments
    v: Params  # second moments


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    # sqrt with a finite (zero) derivative at 0, for second-order meta-gradients through Adam
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))


@register_rule("adam")
def adam(
    lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, learnable: bool = False
) -> InnerRule:
    """Adam with bias correction; its moments start at zero for every task."""

    def init(params: Params) -> AdamState:
        return AdamState({k: torch.zeros_like(p) for k, p in params.items()},
                         {k: torch.zeros_like(p) for k, p in params.items()})

    def update(grads: Params, state: AdamState, params: Params, rule_params: Params, i: int):
        alpha = rule_params.get("lr", lr)
        m = {k: beta1 * state.m[k] + (1 - beta1) * g for k, g in grads.items()}
        v = {k: beta2 * state.v[k] + (1 - beta2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - beta1 ** (i + 1), 1 - beta2 ** (i + 1)
        return {k: -alpha * (m[k] / c1) / (_safe_sqrt(v[k] / c2) + eps) for k in params}, AdamState(m, v)

    return InnerRule(name="adam", update=update, init=init, init_rule_params=scalar_lr(lr, learnable))
