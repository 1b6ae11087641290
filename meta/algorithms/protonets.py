"""Prototypical Networks (Snell et al. 2017): the non-gradient baseline on the same model core."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meta.algorithms.maml import check_no_inner_loop_knobs
from meta.drivers import TaskFn
from meta.learner import MetaLearner, OuterStrategy, Phase
from meta.models.networks import TaskBatchNorm, functional_forward
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
    """``model.embed`` with the model in training or eval mode for the call (the mode matters only to norm layers
    with running statistics: :class:`meta.models.TaskBatchNorm` with ``stats="running"``)."""

    def __init__(self, model: nn.Module, training: bool) -> None:
        super().__init__()
        self.model = model
        self.model_training = training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous = self.model.training
        self.model.train(self.model_training)
        try:
            return self.model.embed(x)
        finally:
            self.model.train(previous)


def has_running_stats(model: nn.Module) -> bool:
    """Whether the model holds :class:`meta.models.TaskBatchNorm` layers with ``stats="running"``."""
    return any(isinstance(m, TaskBatchNorm) and m.stats == "running" for m in model.modules())


#: why a learner whose norm layers keep running statistics trains on ``loop_autograd`` only
RUNNING_STATS_REASON = ("the norm layers keep running statistics (model.norm_stats=running), updated in place on every "
                        "training forward, task after task: only driver=loop_autograd runs that forward once per task "
                        "outside torch.func transforms (auto would time its candidates on the first batch, updating "
                        "them several times)")


class Prototypes(OuterStrategy):
    """Nearest-prototype classification of ``model.embed`` features (the head is unused: zero gradient); no inner
    loop, so no rule. Support and query pass through the network together, as in the official code
    (protonets/models/few_shot.py L39-42: one ``encoder.forward`` of ``cat([xs, xq])``), so batch statistics are
    those of the whole episode. ``ways`` is the largest number of classes in an episode (labels ``0 .. ways-1``);
    smaller episodes work too.

    Training runs the model in training mode, evaluation (validation, test) in eval mode. With ``running_stats``
    (norm layers with running statistics, ProtoNets' ``nn.BatchNorm2d``) that is the official code's protocol:
    each training episode's forward updates the running statistics (``engine.py`` L29 ``model.train()``), and
    evaluation normalizes with them (``protonets/utils/model.py`` L15 and ``scripts/predict/few_shot/eval.py`` L16
    ``model.eval()``: non-transductive); the training forward then runs on ``loop_autograd`` only. Without running
    statistics the two modes compute the same (transductive, each episode's own statistics)."""

    uses_rule = False
    name = "ProtoNets"

    def __init__(self, ways: int, running_stats: bool = False) -> None:
        self.ways = ways
        self.running_stats = running_stats
        if running_stats:
            self.refused = {name: RUNNING_STATS_REASON for name in ("vmap", "loop", "vmap_autograd", "loop_threads",
                                                                     "auto")}

    def train_fn(self, learner: MetaLearner, rule: InnerRule | None, phase: Phase) -> TaskFn:
        return self._episode_fn(learner, training=True)

    def eval_fn(self, learner: MetaLearner, rule: InnerRule | None, steps: int) -> TaskFn:
        """Per-task ``(query loss, (accuracy, {}))`` of the prototype classifier, the model in eval mode."""
        return self._episode_fn(learner, training=False)

    def _episode_fn(self, learner: MetaLearner, training: bool) -> TaskFn:
        # functional_forward, not a bare functional_call: under the loop_threads driver each thread must call its
        # own copy of the module (functional_call swaps tensors into the module it runs)
        embed, loss_fn, ways = functional_forward(_Embedder(learner.model, training)), learner.loss_fn, self.ways

        def fn(params: Params, rule_params: Params, buffers: Params, task: Task, autograd_inner: bool = False):
            sx, sy, qx, qy = task  # (no inner loop: autograd_inner, which the loop_autograd driver sets, is moot)
            prefixed = ({f"model.{k}": v for k, v in params.items()}, {f"model.{k}": v for k, v in buffers.items()})
            embedded = embed(*prefixed, torch.cat([sx, qx]))
            logits = prototype_logits(embedded[: len(sx)], sy, embedded[len(sx):], ways)
            return loss_fn(logits, qy), ((logits.argmax(-1) == qy).to(logits.dtype).mean(), {})

        return fn


def ProtoNet(model: nn.Module, ways: int, loss_fn: LossFn = F.cross_entropy) -> MetaLearner:
    """A :class:`MetaLearner` with the :class:`Prototypes` outer strategy (no rule, no inner steps); running
    statistics if the model's norm layers keep them."""
    return MetaLearner(model, None, 0, loss_fn, outer=Prototypes(ways, running_stats=has_running_stats(model)))


def check_config(cfg: Any) -> None:
    """``algorithm=protonets``'s checks: no inner-loop knobs (no head: any ``task.train_ways``), and
    ``model.norm_stats=running`` trains on ``driver=loop_autograd`` only."""
    check_no_inner_loop_knobs(cfg)
    if cfg.model.norm_stats == "running" and cfg.driver != "loop_autograd":
        raise ValueError(f"model.norm_stats=running with driver={cfg.driver}: {RUNNING_STATS_REASON}; set "
                         f"driver=loop_autograd")


def build(cfg: Any, model: nn.Module, rule: InnerRule | None) -> MetaLearner:
    """``algorithm=protonets``'s learner (the rule is not used)."""
    return ProtoNet(model, ways=max(cfg.task.ways, cfg.task.train_ways or 0, cfg.task.val_ways or 0))
