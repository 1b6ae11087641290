"""learn2learn's MAML (``learn2learn.algorithms.MAML``: ``clone()`` and ``adapt()`` on the same ``nn.Module``) as a
baseline: the meta-gradient of a batch of tasks, computed the way learn2learn's examples compute it.

learn2learn's MAML takes plain SGD steps on *every* parameter of the module, so it expresses exactly the configs
with ``algorithm=maml``, ``inner.rule=sgd`` (fixed step size), ``inner.adapt_norm=true`` and the whole support set
per step (:func:`check_learn2learn_expressible` says which key stands in the way otherwise). The inner loss may be
the mean cross-entropy or cbfinn/maml's sum over examples divided by the shots (``inner.loss_reduction``), written
here as that sum, not as a rescaled mean, so the equality with our learner is a check of both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

Tasks = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Learn2LearnResult(NamedTuple):
    """Per-task query loss and accuracy (fraction correct), and the meta-gradient of the mean query loss."""

    loss: torch.Tensor  # [tasks]
    accuracy: torch.Tensor  # [tasks]
    grads: dict[str, torch.Tensor]  # name -> gradient, as model.named_parameters()


def check_learn2learn_expressible(cfg: DictConfig) -> None:
    """Raise ``ValueError`` naming the first config key whose value learn2learn's MAML cannot express, and the fix."""
    wanted = {
        "algorithm": ("maml", "learn2learn's MAML is MAML"),
        "inner.rule": ("sgd", "learn2learn's MAML takes plain SGD steps"),
        "inner.learnable_lr": (False, "a learnable step size is learn2learn's MetaSGD, not its MAML"),
        "inner.adapt_norm": (True, "learn2learn's MAML adapts every parameter, the norm layers' included"),
        "inner.batch_size": (None, "learn2learn's MAML steps on whatever loss it is given: here the whole support set"),
    }
    for key, (value, why) in wanted.items():
        section, _, name = key.rpartition(".")
        got = cfg[section][name] if section else cfg[name]
        if got != value:
            raise ValueError(f"{key}={got} cannot be expressed by learn2learn's MAML ({why}); set {key}={value}")
    if cfg.inner.options:
        raise ValueError(f"inner.options={dict(cfg.inner.options)} cannot be expressed by learn2learn's MAML (it "
                         f"takes its step size, steps and order from inner.lr, inner.steps and inner.first_order); "
                         f"set inner.options={{}}")


def _inner_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return F.cross_entropy(logits, labels)
    if reduction == "sum_over_shots":  # cbfinn/maml utils.py:L56-L58 xent / K, summed by tf.gradients
        shots = labels.numel() / logits.shape[-1]
        return F.cross_entropy(logits, labels, reduction="sum") / shots
    raise ValueError(f"unknown inner loss reduction {reduction!r}; choose mean or sum_over_shots")


def learn2learn_meta_gradient(
    model: nn.Module,
    tasks: Tasks,
    lr: float,
    steps: int,
    first_order: bool = False,
    loss_reduction: str = "mean",
) -> Learn2LearnResult:
    """learn2learn's MAML on ``model`` for a batch of tasks shaped ``[tasks, n*k, ...]``: per task, ``clone()``,
    ``steps`` calls of ``adapt()`` on the support loss, then the query loss divided by the number of tasks is
    differentiated with respect to ``model``'s parameters (one backward pass per task, as learn2learn's examples
    accumulate ``.backward()``). ``model``'s ``.grad`` fields are not touched."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order)
    names, params = zip(*model.named_parameters())
    total = [torch.zeros_like(p) for p in params]
    losses, accuracies = [], []
    num_tasks = tasks[0].shape[0]
    for support_x, support_y, query_x, query_y in zip(*tasks):
        clone = maml.clone()
        for _ in range(steps):
            clone.adapt(_inner_loss(clone(support_x), support_y, loss_reduction))
        logits = clone(query_x)
        loss = F.cross_entropy(logits, query_y)
        grads = torch.autograd.grad(loss / num_tasks, params)
        total = [t + g for t, g in zip(total, grads)]
        losses.append(loss.detach())
        accuracies.append((logits.argmax(dim=-1) == query_y).to(logits.dtype).mean().detach())
    return Learn2LearnResult(torch.stack(losses), torch.stack(accuracies), dict(zip(names, total)))
