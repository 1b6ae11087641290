"""ANIL (Raghu et al. 2020): only the head adapts in the inner loop; the body is shared."""

from __future__ import annotations

from meta.rules import base
from meta.rules.base import InnerRule, register_rule
from meta.rules.sgd import sgd


@register_rule("anil")
def anil(lr: float = 0.4, first_order: bool = False, head: str = "head.") -> InnerRule:
    """MAML's inner SGD masked to the parameters whose name starts with ``head``."""
    rule = base.masked(sgd(lr=lr), lambda name: name.startswith(head), label="anil")
    return base.first_order(rule) if first_order else rule
