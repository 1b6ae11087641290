"""Per-sample-clipped inner SGD: the DP-SGD step inside the inner loop (without the noise)."""

from __future__ import annotations

import torch

from meta.rules.base import EmptyState, InnerRule, Params, chain, register_rule, sgd


def clip_per_sample(clip: float = 1.0) -> InnerRule:
    """Per-sample gradients ``[n_samples, *shape]`` clipped to a global norm (over all adapted parameters) of at
    most ``clip``, then averaged over the samples: updates shaped like the parameters, for the next rule."""

    def update(grads: Params, state: EmptyState, params: Params, rule_params: Params, i: int):
        norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
        scale = clip / norms.clamp(min=clip)  # min(1, C / |g_i|), exactly 1 below the bound
        return {k: torch.einsum("n,n...->...", scale, g) / g.shape[0] for k, g in grads.items()}, state

    return InnerRule(name="clip_per_sample", update=update, per_sample=True)


@register_rule("clipped_sgd")
def clipped_sgd(lr: float = 0.4, clip: float = 1.0, learnable: bool = False) -> InnerRule:
    """Clip each support sample's gradient to at most ``clip``, average over samples, then SGD: ``chain`` of
    :func:`clip_per_sample` and :func:`meta.rules.sgd`. Needs a model without batch statistics (no task_bn)."""
    return chain(clip_per_sample(clip), sgd(lr=lr, learnable=learnable), name="clipped_sgd")
