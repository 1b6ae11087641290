"""meta: vectorized gradient-based meta-learning (MAML and its family) on torch.func."""

from meta.drivers import DRIVERS, TaskBatchResult, loop_driver, vmap_driver
from meta.learner import Backprop, FusedNormError, MetaLearner, OuterStrategy, Phase, adapt, task_loss
from meta.models import MLP, Conv4, TaskBatchNorm, build_model
from meta.per_sample import per_sample_grads, per_sample_grads_loop
from meta.rules import RULES, InnerRule, apply_updates, build_rule, chain, first_order, masked, register_rule, sgd
from meta.types import Params, Task

__version__ = "0.1.0"

#: training as a library call (meta/training/run.py), imported on first use: ``meta.train(meta.load_config(...))``
_RUN_API = {
    "train": "meta.training.run", "evaluate": "meta.training.run", "load_config": "meta.training.run",
    "RunResult": "meta.training.run", "RunError": "meta.training.errors", "RunInterrupted": "meta.training.errors",
}


def __getattr__(name: str):
    """``meta.train``, ``meta.evaluate``, ``meta.load_config``, ``meta.RunResult``, ``meta.RunError`` and
    ``meta.RunInterrupted``, imported when first used (``import meta`` stays light and free of the training code)."""
    if name in _RUN_API:
        import importlib

        return getattr(importlib.import_module(_RUN_API[name]), name)
    raise AttributeError(f"module 'meta' has no attribute {name!r}")

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
    "RunError",
    "RunInterrupted",
    "RunResult",
    "Task",
    "TaskBatchNorm",
    "TaskBatchResult",
    "adapt",
    "apply_updates",
    "build_model",
    "build_rule",
    "chain",
    "evaluate",
    "first_order",
    "load_config",
    "loop_driver",
    "masked",
    "per_sample_grads",
    "per_sample_grads_loop",
    "register_rule",
    "sgd",
    "task_loss",
    "train",
    "vmap_driver",
]
