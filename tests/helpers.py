"""Shared test helpers: random task batches and explicit reference implementations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_tasks(
    tasks: int, ways: int, shots: int, queries: int, size: int = 28, seed: int = 0, dtype=torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random balanced task tensors shaped ``[tasks, ways*shots, 1, size, size]`` etc."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    support_x = torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=dtype)
    query_x = torch.rand(tasks, ways * queries, 1, size, size, generator=g, dtype=dtype)
    # make classes distinguishable so the loss landscape is not flat
    support_x = support_x + support_y[..., None, None, None].to(dtype) * 0.3
    query_x = query_x + query_y[..., None, None, None].to(dtype) * 0.3
    return support_x, support_y, query_x, query_y


def _batch_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = (x - mean) / torch.sqrt(var + eps)
    out = out if weight is None else out * weight.view(shape)
    return out if bias is None else out + bias.view(shape)


def reference_forward(
    kind: str, norm: str, p: dict[str, torch.Tensor], x: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Hand-written forward of Conv4 (strided or max-pool) and MLP, independent of meta.models. Norm layers
    use whichever of their ``weight`` and ``bias`` ``p`` holds, and ``eps``."""

    def normed(h: torch.Tensor, prefix: str) -> torch.Tensor:
        return _batch_norm(h, p.get(prefix + ".weight"), p.get(prefix + ".bias"), eps) if norm == "task_bn" else h

    if kind in ("conv4", "conv4_maxpool"):
        h = x
        for i in range(4):
            stride = 2 if kind == "conv4" else 1
            h = F.conv2d(h, p[f"features.{i}.conv.weight"], p[f"features.{i}.conv.bias"], stride=stride, padding=1)
            h = torch.relu(normed(h, f"features.{i}.norm"))
            if kind == "conv4_maxpool":
                h = F.max_pool2d(h, 2)
        h = h.mean(dim=(2, 3)) if kind == "conv4" else h.flatten(1)
    else:
        h = x.flatten(1)
        for i in (1, 4, 7, 10):
            h = torch.relu(normed(F.linear(h, p[f"features.{i}.weight"], p[f"features.{i}.bias"]), f"features.{i+1}"))
    return F.linear(h, p["head.weight"], p["head.bias"])


def reference_maml(
    kind: str,
    norm: str,
    params: dict[str, torch.Tensor],
    tasks,
    lr: float,
    steps: int,
    first_order: bool,
    batch_size: int | None = None,
    *,
    shots: int | None = None,
    frozen: frozenset[str] = frozenset(),
    eps: float = 1e-5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """MAML with plain autograd (no torch.func): mean query loss, its gradient, adapted params per task.
    With ``batch_size``, inner step ``i`` uses support examples ``i*batch_size + j`` (modulo their number).
    With ``shots``, the inner loss is cbfinn/maml's: the per-example cross-entropy summed and divided by
    ``shots``. The parameters named in ``frozen`` are not adapted; ``eps`` is the batch norm's."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    losses, adapted_all = [], []
    for sx, sy, qx, qy in zip(*tasks):
        fast = dict(leaves)
        for i in range(steps):
            n = len(sx)
            rows = [(i * batch_size + j) % n for j in range(batch_size)] if batch_size else list(range(n))
            logits = reference_forward(kind, norm, fast, sx[rows], eps)
            if shots is None:
                loss = F.cross_entropy(logits, sy[rows])
            else:
                loss = F.cross_entropy(logits, sy[rows], reduction="sum") / shots
            names = [k for k in fast if k not in frozen]
            grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=not first_order)
            fast = {**fast, **{k: fast[k] - lr * g for k, g in zip(names, grads)}}
        losses.append(F.cross_entropy(reference_forward(kind, norm, fast, qx, eps), qy))
        adapted_all.append({k: v.detach() for k, v in fast.items()})
    mean_loss = torch.stack(losses).mean()
    grads = torch.autograd.grad(mean_loss, list(leaves.values()))
    return torch.stack(losses).detach(), dict(zip(leaves, grads)), adapted_all


def has_omniglot() -> bool:
    """Whether the data root holds Omniglot (zips or extracted folders)."""
    from meta.data import resolve_data_root

    root = resolve_data_root(None) / "omniglot"
    return (root / "images_background.zip").exists() or (root / "images_background").is_dir()
