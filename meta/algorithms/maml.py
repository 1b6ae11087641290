"""MAML (Finn et al. 2017) as a config ``algorithm``: a plain :class:`meta.MetaLearner` (any ``inner.rule``; first
order when ``inner.first_order``), and the config checks the algorithms with a MAML inner loop share."""

from __future__ import annotations

from typing import Any

from torch import nn

from meta.learner import MetaLearner
from meta.rules.base import InnerRule


def check_adapted_head(cfg: Any) -> None:
    """An algorithm that adapts an N-way linear head trains and validates on N ways: refuse another
    ``task.train_ways`` or ``task.val_ways``."""
    if cfg.task.train_ways not in (None, cfg.task.ways):
        raise ValueError(f"task.train_ways={cfg.task.train_ways} differs from task.ways={cfg.task.ways}, but "
                         f"algorithm={cfg.algorithm} adapts a {cfg.task.ways}-way linear head, which fixes the ways; "
                         f"only protonets (no head) can train on other ways")
    if cfg.task.val_ways not in (None, cfg.task.ways):
        raise ValueError(f"task.val_ways={cfg.task.val_ways} differs from task.ways={cfg.task.ways}, but "
                         f"algorithm={cfg.algorithm} adapts a {cfg.task.ways}-way linear head; only protonets (no "
                         f"head) can validate on other ways")


def check_no_inner_loop_knobs(cfg: Any) -> None:
    """Refuse the MAML inner loop's knobs for an algorithm whose inner loop is not MAML's."""
    for key in ("batch_size", "test_batch_size"):
        if cfg.inner[key] is not None:
            raise ValueError(f"inner.{key} applies to the inner loops of maml, mamlpp and reptile, not "
                             f"algorithm={cfg.algorithm}")
    if cfg.inner.loss_reduction != "mean":
        raise ValueError(f"inner.loss_reduction={cfg.inner.loss_reduction} applies to the inner loops of maml, "
                         f"mamlpp and reptile, not algorithm={cfg.algorithm}; set inner.loss_reduction=mean")


def inner_loop(cfg: Any) -> dict[str, Any]:
    """The learner's inner-loop parts from the ``inner`` section (keyword arguments of :class:`MetaLearner`)."""
    return {"inner_batch_size": cfg.inner.batch_size, "test_batch_size": cfg.inner.test_batch_size,
            "inner_loss_reduction": cfg.inner.loss_reduction}


def check_config(cfg: Any) -> None:
    """``algorithm=maml``'s own checks."""
    check_adapted_head(cfg)


def build(cfg: Any, model: nn.Module, rule: InnerRule) -> MetaLearner:
    """``algorithm=maml``'s learner."""
    return MetaLearner(model, rule, cfg.inner.steps, **inner_loop(cfg))
