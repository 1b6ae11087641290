"""Prototypical Networks (Snell et al. 2017): the non-gradient baseline on the same model core."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meta.algorithms.maml import check_no_inner_loop_knobs
from meta.drivers import TaskFn
from meta.learner import MetaLearner, OuterStrategy, Phase
from meta.models.networks import functional_forward
from meta.rules.base import InnerRule
from meta.types import LossFn, Params, Task


def prototype_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int) -> torch.Tensor:
    """``-|q - c_n|^2`` for each query embedding and class prototype ``c_n`` (mean support embedding).

    ``ways`` is an upper bound on the labels: a class with no support example has no prototype, and its
    logit is ``-inf`` (so one learner serves episodes of different ways, e.g. 60-way training, 5-way test).
    """
    classes = torch.arange(ways, device=support_y.device)
    onehot = (support_y[:, None] == classes).to(support.dtype)  # [n_support, ways]
    counts = onehot.sum(dim=0)
    prototypes = (onehot.T @ support) / counts.clamp_min(1)[:, None]  # [ways, dim]
    logits = -((query[:, None, :] - prototypes[None, :, :]) ** 2).sum(dim=-1)
    return logits.masked_fill(counts == 0, float("-inf"))


class _Embedder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


class Prototypes(OuterStrategy):
    """Nearest-prototype classification of ``model.embed`` features (the head is unused: zero gradient); no inner
    loop, so no rule. Support and query pass through the network together, as in the official code, so batch
    statistics are those of the whole episode. ``ways`` is the largest number of classes in an episode (labels
    ``0 .. ways-1``); smaller episodes work too."""

    uses_rule = False
    name = "ProtoNets"

    def __init__(self, ways: int) -> None:
        self.ways = ways

    def train_fn(self, learner: MetaLearner, rule: InnerRule | None, phase: Phase) -> TaskFn:
        return self.eval_fn(learner, rule, 0)

    def eval_fn(self, learner: MetaLearner, rule: InnerRule | None, steps: int) -> TaskFn:
        """Per-task ``(query loss, (accuracy, {}))`` of the prototype classifier."""
        # functional_forward, not a bare functional_call: under the loop_threads driver each thread must call its
        # own copy of the module (functional_call swaps tensors into the module it runs)
        embed, loss_fn, ways = functional_forward(_Embedder(learner.model)), learner.loss_fn, self.ways

        def fn(params: Params, rule_params: Params, buffers: Params, task: Task, autograd_inner: bool = False):
            sx, sy, qx, qy = task  # (no inner loop: autograd_inner, which the loop_autograd driver sets, is moot)
            prefixed = ({f"model.{k}": v for k, v in params.items()}, {f"model.{k}": v for k, v in buffers.items()})
            embedded = embed(*prefixed, torch.cat([sx, qx]))
            logits = prototype_logits(embedded[: len(sx)], sy, embedded[len(sx):], ways)
            return loss_fn(logits, qy), ((logits.argmax(-1) == qy).to(logits.dtype).mean(), {})

        return fn


def ProtoNet(model: nn.Module, ways: int, loss_fn: LossFn = F.cross_entropy) -> MetaLearner:
    """A :class:`MetaLearner` with the :class:`Prototypes` outer strategy (no rule, no inner steps)."""
    return MetaLearner(model, None, 0, loss_fn, outer=Prototypes(ways))


check_config = check_no_inner_loop_knobs  # no head: any task.train_ways


def build(cfg: Any, model: nn.Module, rule: InnerRule | None) -> MetaLearner:
    """``algorithm=protonets``'s learner (the rule is not used)."""
    return ProtoNet(model, ways=max(cfg.task.ways, cfg.task.train_ways or 0))
