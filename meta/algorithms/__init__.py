"""Meta-learners beyond the rule-based :class:`meta.MetaLearner`, each with the same interface."""

from meta.algorithms.imaml import IMAML, conjugate_gradient, implicit_meta_grad, proximal_adapt
from meta.algorithms.mamlpp import MAMLPlusPlus, msl_weights
from meta.algorithms.protonets import ProtoNet, prototype_logits
from meta.algorithms.reptile import Reptile

__all__ = [
    "IMAML",
    "MAMLPlusPlus",
    "ProtoNet",
    "Reptile",
    "conjugate_gradient",
    "implicit_meta_grad",
    "msl_weights",
    "proximal_adapt",
    "prototype_logits",
]
