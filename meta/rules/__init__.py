"""Inner-loop rules: pure, vmappable update functions with explicit learnable parameters (optax-shaped).

Importing this package imports every module in it (:func:`discover`), so a rule registered with
:func:`register_rule` in its own file is in :data:`RULES` without any other file naming it.
"""

import importlib
import pkgutil

from meta.rules.adam import adam
from meta.rules.anil import anil
from meta.rules.base import (
    RULES,
    ChainState,
    EmptyState,
    InnerRule,
    apply_updates,
    build_rule,
    chain,
    first_order,
    masked,
    register_rule,
    sgd,
    with_initial_state,
)
from meta.rules.clipped import clip_per_sample, clipped_sgd
from meta.rules.mamlpp import mamlpp, norm_parameter_names
from meta.rules.metacurvature import metacurvature
from meta.rules.metasgd import metasgd
from meta.rules.momentum import momentum


def discover() -> list[str]:
    """Import every module of this package (each registers its rules); return their names."""
    names = [m.name for m in pkgutil.iter_modules(__path__)]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


discover()

__all__ = [
    "RULES",
    "ChainState",
    "EmptyState",
    "InnerRule",
    "adam",
    "anil",
    "apply_updates",
    "build_rule",
    "chain",
    "clip_per_sample",
    "clipped_sgd",
    "discover",
    "first_order",
    "mamlpp",
    "masked",
    "metacurvature",
    "metasgd",
    "momentum",
    "norm_parameter_names",
    "register_rule",
    "sgd",
    "with_initial_state",
]
