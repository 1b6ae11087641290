"""ANIL (Raghu et al. 2020): only the head adapts in the inner loop; the body is shared."""

from __future__ import annotations

from meta.rules.base import InnerRule, masked, register_rule, sgd


@register_rule("anil")
def anil(lr: float = 0.4, head: str = "head.", learnable: bool = False) -> InnerRule:
    """MAML's inner SGD masked to the parameters whose name starts with ``head``."""
    return masked(sgd(lr=lr, learnable=learnable), lambda name: name.startswith(head), label="anil")
