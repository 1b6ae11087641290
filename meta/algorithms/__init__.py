"""The algorithm family, each a :class:`meta.MetaLearner` composed of parts (outer strategy, schedule), and the
config's ``algorithm=`` table: how each builds its learner and the config checks that belong to it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from meta.algorithms import imaml, maml, mamlpp, protonets, reptile
from meta.algorithms.imaml import (
    IMAML,
    Implicit,
    conjugate_gradient,
    implicit_meta_grad,
    proximal_adapt,
    pullback_adapt,
)
from meta.algorithms.mamlpp import MAMLPlusPlus, MultiStepSchedule, msl_weights
from meta.algorithms.protonets import ProtoNet, Prototypes, prototype_logits
from meta.algorithms.reptile import Reptile, ReptileDifference
from meta.drivers import drivers_of
from meta.learner import Backprop, MetaLearner, OuterStrategy
from meta.rules.base import InnerRule


class Algorithm(NamedTuple):
    """One value of the config's ``algorithm``."""

    #: its outer strategy's class (its row of the driver table and the drivers it refuses)
    strategy: type[OuterStrategy]
    #: ``check_config(cfg)`` raises ``ValueError`` for settings this algorithm cannot honour
    check_config: Callable[[Any], None]
    #: ``build(cfg, model, rule) -> MetaLearner``
    build: Callable[[Any, nn.Module, InnerRule], MetaLearner]
    #: whether ``train.cuda_graph`` can capture its meta-step
    cuda_graph: bool = False

    def supported_drivers(self) -> tuple[str, ...]:
        """The drivers its learners accept, ``auto`` included."""
        return (*drivers_of(self.strategy.kind, tuple(self.strategy.refused)), "auto")


ALGORITHMS: dict[str, Algorithm] = {
    "maml": Algorithm(Backprop, maml.check_config, maml.build, cuda_graph=True),
    "mamlpp": Algorithm(Backprop, mamlpp.check_config, mamlpp.build, cuda_graph=True),
    "reptile": Algorithm(ReptileDifference, reptile.check_config, reptile.build),
    "imaml": Algorithm(Implicit, imaml.check_config, imaml.build),
    "protonets": Algorithm(Prototypes, protonets.check_config, protonets.build),
}

__all__ = [
    "ALGORITHMS",
    "IMAML",
    "Algorithm",
    "Implicit",
    "MAMLPlusPlus",
    "MultiStepSchedule",
    "ProtoNet",
    "Prototypes",
    "Reptile",
    "ReptileDifference",
    "conjugate_gradient",
    "implicit_meta_grad",
    "msl_weights",
    "proximal_adapt",
    "pullback_adapt",
    "prototype_logits",
]
