"""meta: vectorized gradient-based meta-learning (MAML and its family) on torch.func."""

from meta.drivers import DRIVERS, TaskBatchResult, loop_driver, vmap_driver
from meta.learner import Backprop, FusedNormError, MetaLearner, OuterStrategy, Phase, adapt, task_loss
from meta.models import MLP, Conv4, TaskBatchNorm, build_model
from meta.per_sample import per_sample_grads, per_sample_grads_loop
from meta.rules import RULES, InnerRule, apply_updates, build_rule, chain, first_order, masked, register_rule, sgd
from meta.types import Params, Task

__version__ = "0.1.0"

__all__ = [
    "Backprop",
    "DRIVERS",
    "MLP",
    "RULES",
    "Conv4",
    "FusedNormError",
    "InnerRule",
    "MetaLearner",
    "OuterStrategy",
    "Params",
    "Phase",
    "Task",
    "TaskBatchNorm",
    "TaskBatchResult",
    "adapt",
    "apply_updates",
    "build_model",
    "build_rule",
    "chain",
    "first_order",
    "loop_driver",
    "masked",
    "per_sample_grads",
    "per_sample_grads_loop",
    "register_rule",
    "sgd",
    "task_loss",
    "vmap_driver",
]
