"""Inner-loop rules: pure, vmappable update functions with explicit learnable parameters."""

from meta.rules.base import (
    RULES,
    InnerRule,
    build_rule,
    first_order,
    masked,
    register_rule,
)
from meta.rules.sgd import sgd

__all__ = ["RULES", "InnerRule", "build_rule", "first_order", "masked", "register_rule", "sgd"]
