"""Per-sample-clipped inner SGD: the DP-SGD step inside the inner loop (without the noise)."""

from __future__ import annotations

import torch

from meta.rules import base
from meta.rules.base import InnerRule, Params, State, register_rule


@register_rule("clipped_sgd")
def clipped_sgd(lr: float = 0.4, clip: float = 1.0, first_order: bool = False) -> InnerRule:
    """Clip each support sample's gradient (global norm over all adapted parameters) to at most ``clip``,
    average over samples, step ``p - lr * mean``. Needs a model without batch statistics (no task_bn)."""

    def step(params: Params, grads: Params, state: State, rule_params: Params, i: int):
        # grads[k]: [n_samples, *shape]; per-sample global norm over every adapted tensor
        norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
        scale = clip / norms.clamp(min=clip)  # min(1, C / |g_i|), exactly 1 below the bound
        mean = {k: torch.einsum("n,n...->...", scale, g) / g.shape[0] for k, g in grads.items()}
        return {k: p - lr * mean[k] for k, p in params.items()}, state

    rule = InnerRule(name="clipped_sgd", step=step, per_sample=True)
    return base.first_order(rule) if first_order else rule
