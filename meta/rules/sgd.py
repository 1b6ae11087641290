"""Plain gradient descent, the MAML inner loop."""

from __future__ import annotations

from meta.rules.base import EmptyState, InnerRule, Params, register_rule, scalar_lr


@register_rule("sgd")
def sgd(lr: float = 0.4, learnable: bool = False) -> InnerRule:
    """MAML's inner SGD: updates ``-lr * g``. ``learnable=True`` makes the one step size a meta-parameter."""

    def update(grads: Params, state: EmptyState, params: Params, rule_params: Params, i: int):
        alpha = rule_params.get("lr", lr)
        return {k: -alpha * grads[k] for k in params}, state

    return InnerRule(name="sgd", update=update, init_rule_params=scalar_lr(lr, learnable))
