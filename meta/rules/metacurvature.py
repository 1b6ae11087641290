"""MetaCurvature (Park & Oliva 2019): learnable Kronecker-factored preconditioners of the inner gradient."""

from __future__ import annotations

import torch
from einops import rearrange

from meta.rules.base import EmptyState, InnerRule, Params, register_rule


def _factor_sizes(shape: torch.Size) -> dict[str, int]:
    if len(shape) == 1:
        return {"vec": shape[0]}
    if len(shape) == 2:
        return {"out": shape[0], "in": shape[1]}
    if len(shape) == 4:
        return {"out": shape[0], "in": shape[1], "filter": shape[2] * shape[3]}
    raise ValueError(f"metacurvature supports 1-D, 2-D and 4-D parameters, got shape {tuple(shape)}")


def precondition(g: torch.Tensor, m: dict[str, torch.Tensor]) -> torch.Tensor:
    """``mc(G) = G x_1 M_out x_2 M_in x_3 M_filter`` (mode products); a vector gets one full matrix."""
    if g.dim() == 1:
        return m["vec"] @ g
    if g.dim() == 2:
        return m["out"] @ g @ m["in"].T
    kh, kw = g.shape[2:]
    # a conv kernel [out, in, kh, kw] as a 3-way tensor [out, in, kh*kw]
    g3 = rearrange(g, "o i h w -> o i (h w)")
    out = torch.einsum("ao,bi,cf,oif->abc", m["out"], m["in"], m["filter"], g3)
    return rearrange(out, "o i (h w) -> o i h w", h=kh, w=kw)


@register_rule("metacurvature")
def metacurvature(lr: float = 0.4) -> InnerRule:
    """Updates ``-lr * mc(g)`` with per-layer Kronecker factors ``<name>.out``, ``<name>.in``, ``<name>.filter``
    (``<name>.vec`` for 1-D parameters), initialized to identities, so that it starts as MAML."""

    def init_rule_params(params: Params) -> Params:
        return {f"{k}.{f}": torch.eye(n, dtype=p.dtype) for k, p in params.items()
                for f, n in _factor_sizes(p.shape).items()}

    def update(grads: Params, state: EmptyState, params: Params, rule_params: Params, i: int):
        def factors(k: str) -> dict[str, torch.Tensor]:
            return {f: rule_params[f"{k}.{f}"] for f in _factor_sizes(params[k].shape)}

        return {k: -lr * precondition(grads[k], factors(k)) for k in params}, state

    return InnerRule(name="metacurvature", update=update, init_rule_params=init_rule_params)
