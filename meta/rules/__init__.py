"""Inner-loop rules: pure, vmappable update functions with explicit learnable parameters.

Importing this package registers every rule below in :data:`RULES`.
"""

from meta.rules.adam import adam
from meta.rules.anil import anil
from meta.rules.base import (
    RULES,
    InnerRule,
    build_rule,
    first_order,
    masked,
    register_rule,
)
from meta.rules.clipped import clipped_sgd
from meta.rules.mamlpp import mamlpp, norm_parameter_names
from meta.rules.metacurvature import metacurvature
from meta.rules.metasgd import metasgd
from meta.rules.momentum import momentum
from meta.rules.sgd import sgd

__all__ = [
    "RULES",
    "InnerRule",
    "adam",
    "anil",
    "build_rule",
    "clipped_sgd",
    "first_order",
    "mamlpp",
    "masked",
    "metacurvature",
    "metasgd",
    "momentum",
    "norm_parameter_names",
    "register_rule",
    "sgd",
]
