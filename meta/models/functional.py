"""The functional view of a model: parameters and buffers as dicts of tensors."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from meta.types import Params


def parameters_of(model: nn.Module) -> Params:
    """The model's parameters as a name -> tensor dict (the live tensors, not copies)."""
    return dict(model.named_parameters())


def buffers_of(model: nn.Module) -> Params:
    """The model's buffers as a name -> tensor dict."""
    return dict(model.named_buffers())


def functional_forward(model: nn.Module) -> Callable[[Params, Params, torch.Tensor], torch.Tensor]:
    """Return ``forward(params, buffers, x)``, a pure function of its arguments.

    Thread-safe: ``functional_call`` swaps tensors into the module while it runs, so a thread other than the one
    that built this function calls its own copy of the module (made on its first call)."""
    owner, local = threading.get_ident(), threading.local()

    def forward(params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        module = model
        if threading.get_ident() != owner:
            if not hasattr(local, "module"):
                local.module = copy.deepcopy(model)
            module = local.module
        return functional_call(module, (params, buffers), (x,))

    return forward


def autograd_grads(loss: torch.Tensor, trees: tuple[Params, ...], create_graph: bool = False) -> tuple[Params, ...]:
    """``d loss / d tree`` for each tree, with plain ``torch.autograd.grad``; tensors the loss does not touch
    get zeros."""
    flat = [v for tree in trees for v in tree.values()]
    grads = torch.autograd.grad(loss, flat, create_graph=create_graph, allow_unused=True)
    filled = iter([torch.zeros_like(v) if g is None else g for v, g in zip(flat, grads)])
    return tuple({k: next(filled) for k in tree} for tree in trees)


def detached(tree: Params) -> Params:
    """A copy of a tensor dict cut from every autograd graph (and torch.func level)."""
    return {k: v.detach() for k, v in tree.items()}


def global_norm(tree: Params) -> torch.Tensor:
    """The l2 norm of all tensors of a dict taken together."""
    return torch.sqrt(sum((v.double() ** 2).sum() for v in tree.values()))


def relative_error(a: Params, b: Params) -> float:
    """Global-norm relative error ``|a - b| / max(|b|, tiny)`` between two tensor dicts with the same keys."""
    if a.keys() != b.keys():
        raise KeyError(f"key mismatch: {sorted(set(a) ^ set(b))}")
    diff = global_norm({k: a[k] - b[k] for k in a})
    return float(diff / global_norm(b).clamp_min(1e-300))
