"""The inner rule of MAML++ (Antoniou et al. 2019): LSLR and per-step batch-norm weights and biases.

The other MAML++ switches (multi-step loss, derivative-order annealing, cosine meta-lr) act on the
outer loop and live in :mod:`meta.algorithms.mamlpp` and the training config.
"""

from __future__ import annotations

import torch

from meta.rules.base import EmptyState, InnerRule, Params, register_rule


def norm_parameter_names(params: Params) -> set[str]:
    """Names of norm-layer affine parameters: every 1-D ``*.weight`` (conv/linear weights are >= 2-D)
    and the ``*.bias`` beside it."""
    scales = [k for k, p in params.items() if k.endswith(".weight") and p.dim() == 1]
    return {n for k in scales for n in (k, k[: -len("weight")] + "bias") if n in params}


@register_rule("mamlpp")
def mamlpp(
    lr: float = 0.1, steps: int = 5, lslr: bool = True, per_step_bn: bool = True
) -> InnerRule:
    """SGD with, as separate switches, a learnable learning rate per parameter tensor and per step (LSLR,
    ``lr.<name>``: ``[steps]``) and per-step norm weights and biases (``bn.<name>``: ``[steps, *shape]``),
    which then replace the model's norm parameters in the forward at each step and are not adapted.
    Steps beyond ``steps`` (e.g. more test-time steps) reuse the last step's values."""

    def init_rule_params(params: Params) -> Params:
        norms = norm_parameter_names(params) if per_step_bn else set()
        out = {f"bn.{k}": params[k].detach().expand(steps, *params[k].shape).clone() for k in sorted(norms)}
        if lslr:
            out |= {f"lr.{k}": torch.full((steps,), float(lr), dtype=p.dtype) for k, p in params.items()
                    if k not in norms}
        return out

    def at_step(params: Params, rule_params: Params, i: int) -> Params:
        j = min(i, steps - 1)
        return {k: rule_params[f"bn.{k}"][j] if f"bn.{k}" in rule_params else p for k, p in params.items()}

    def update(grads: Params, state: EmptyState, params: Params, rule_params: Params, i: int):
        j = min(i, steps - 1)  # the per-step norm parameters get no update: they are not adapted
        return {k: -(rule_params[f"lr.{k}"][j] if lslr else lr) * grads[k] for k in params
                if f"bn.{k}" not in rule_params}, state

    return InnerRule(name="mamlpp", update=update, init_rule_params=init_rule_params, at_step=at_step)
