"""Adam as an inner rule (Reptile's inner optimizer, with beta1 = 0 there)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from meta.rules.base import InnerRule, Params, register_rule, scalar_lr


class AdamState(NamedTuple):
    m: Params  # first moments
    v: Params  # second moments
    #: updates taken so far (the bias corrections' exponent: TF's beta1_power / beta2_power, optax's count). A Python
    #: int: it starts at 0 with every task unless the state is carried from task to task (inner.persistent_state)
    count: int = 0


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    # sqrt with a finite (zero) derivative at 0, for second-order meta-gradients through Adam
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))


@register_rule("adam")
def adam(
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    epsilon_hat: bool = False,
    learnable: bool = False,
) -> InnerRule:
    """Adam with bias correction; its moments start at zero (``count`` 0) for every task, unless a carried state is
    given (:func:`meta.rules.with_initial_state`).

    ``epsilon_hat``: ``eps`` is added to ``sqrt(v)`` before the bias correction, as Kingma & Ba's epsilon-hat
    (Sec. 2, end) and ``tf.train.AdamOptimizer`` (``lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t)``,
    ``lr_t m / (sqrt(v) + eps)``, openai/supervised-reptile's inner optimizer); default: to ``sqrt(v / c2)``."""

    def init(params: Params) -> AdamState:
        return AdamState({k: torch.zeros_like(p) for k, p in params.items()},
                         {k: torch.zeros_like(p) for k, p in params.items()})

    def update(grads: Params, state: AdamState, params: Params, rule_params: Params, i: int):
        alpha = rule_params.get("lr", lr)
        m = {k: beta1 * state.m[k] + (1 - beta1) * g for k, g in grads.items()}
        v = {k: beta2 * state.v[k] + (1 - beta2) * g * g for k, g in grads.items()}
        count = state.count + 1  # equals i + 1 for a fresh state
        c1, c2 = 1 - beta1 ** count, 1 - beta2 ** count
        if epsilon_hat:
            updates = {k: -(alpha * c2 ** 0.5 / c1) * m[k] / (_safe_sqrt(v[k]) + eps) for k in params}
        else:
            updates = {k: -alpha * (m[k] / c1) / (_safe_sqrt(v[k] / c2) + eps) for k in params}
        return updates, AdamState(m, v, count)

    return InnerRule(name="adam", update=update, init=init, init_rule_params=scalar_lr(lr, learnable))
