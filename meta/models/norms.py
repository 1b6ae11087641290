"""Normalization layers that are exact under ``torch.func`` transforms.

``TaskBatchNorm`` is batch normalization with per-batch statistics. Under
``vmap`` over tasks it is written from ``mean``/``var`` primitives, so each task
is normalized with its own statistics (transductive, as in MAML) and second-order
gradients are exact. It keeps no running statistics, so it has no buffers and
nothing is updated in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._C import _functorch

#: Fused norm layers whose second-order gradients are wrong under vmap on
#: torch 2.14.1 (pytorch/functorch#534).
FUSED_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
)


def under_vmap() -> bool:
    """Whether a ``torch.vmap`` transform is active (functorch's interpreter stack holds a vmap level)."""
    stack = _functorch.get_interpreter_stack()
    return stack is not None and any(level.key() == _functorch.TransformType.Vmap for level in stack)


NORM_AFFINES = ("gamma_beta", "beta", "none")
#: where TaskBatchNorm's statistics come from: ``batch`` (each batch's own, in training and evaluation alike) or
#: ``running`` (nn.BatchNorm2d's: batch statistics in training mode, which also update running averages; the
#: running averages in eval mode)
NORM_STATS = ("batch", "running")


class TaskBatchNorm(nn.Module):
    """Batch norm over every dimension but the channel one (dim 1), with a learnable affine.

    With ``stats="batch"`` (the default) statistics come from the current batch (one task's support or query set),
    in any mode; there are no running statistics and no buffers. With ``stats="running"`` the layer is
    ``nn.BatchNorm2d`` (ProtoNets' encoder, jakesnell/prototypical-networks protonets/models/few_shot.py L71): in
    training mode it normalizes with the batch statistics and updates ``running_mean``/``running_var`` (momentum
    ``momentum``, unbiased variance) and ``num_batches_tracked`` in place; in eval mode (``model.eval()``) it
    normalizes with the running statistics (non-transductive). ``affine`` picks the learnable tensors:
    ``gamma_beta`` (``weight`` and ``bias``, PyTorch's default), ``beta`` (``bias`` only:
    ``tf.contrib.layers.batch_norm``'s default ``scale=False, center=True``, MAML's) or ``none``.

    Two implementations of the same math: under ``vmap`` (and on non-CPU devices) the ``mean``/``var``
    primitives, because the fused kernel's second-order gradients are wrong under vmap (pytorch/functorch#534);
    elsewhere on a CPU, PyTorch's fused batch-norm kernel, which is exact there and makes the per-task loops
    7-12% faster. ``use_fused_kernel = False`` (on the class or one layer) forces the primitives everywhere.
    """

    use_fused_kernel: bool = True

    def __init__(
        self, num_features: int, eps: float = 1e-5, affine: str = "gamma_beta", stats: str = "batch",
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if affine not in NORM_AFFINES:
            raise ValueError(f"unknown norm affine {affine!r}; choose one of {NORM_AFFINES}")
        if stats not in NORM_STATS:
            raise ValueError(f"unknown norm stats {stats!r}; choose one of {NORM_STATS}")
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.stats = stats
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine == "gamma_beta" else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine != "none" else None
        if stats == "running":  # nn.BatchNorm2d's buffers, names and initial values
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats == "running":
            if not self.training:
                return self._normalize_with_running_stats(x)
            self._update_running_stats(x)
        return self._normalize_with_batch_stats(x)

    def _update_running_stats(self, x: torch.Tensor) -> None:
        """nn.BatchNorm2d's training-mode update, in place: ``running = (1 - momentum) * running + momentum * batch``
        with the unbiased batch variance. In place, so it is refused under torch.func transforms (vmap, grad): train
        with plain autograd, one task after another (the ``loop_autograd`` driver)."""
        stack = _functorch.get_interpreter_stack()
        if stack:
            raise RuntimeError("TaskBatchNorm(stats='running') updates its running statistics in place on every "
                               "training forward, which torch.func transforms cannot do: use driver=loop_autograd "
                               "(or put the model in eval mode)")
        dims = [0, *range(2, x.dim())]
        with torch.no_grad():
            self.running_mean.lerp_(x.mean(dim=dims).to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(x.var(dim=dims, unbiased=True).to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)

    def _normalize_with_running_stats(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode with ``stats='running'``: nn.BatchNorm2d.eval()'s normalization (non-transductive)."""
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        return out if self.bias is None else out + self.bias.view(shape)

    def _normalize_with_batch_stats(self, x: torch.Tensor) -> torch.Tensor:
        fused_ok = x.device.type == "cpu" and x.numel() > x.shape[1]  # the kernel refuses one value per channel
        if self.use_fused_kernel and fused_ok and not under_vmap():
            # the kernel's double backward fails without a weight when the bias is differentiated twice (the loop
            # drivers' second-order MAML with the beta-only norm adapted in the inner loop): pass a constant one
            weight = self.weight
            if weight is None and self.bias is not None:
                weight = torch.ones(self.num_features, dtype=x.dtype, device=x.device)
            return F.batch_norm(x, None, None, weight, self.bias, training=True, eps=self.eps)
        dims = [0, *range(2, x.dim())]
        centered = x - x.mean(dim=dims, keepdim=True)
        # two-pass variance: the same value as x.var(unbiased=False), about 5x faster on CPU
        var = (centered * centered).mean(dim=dims, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = centered * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        return out if self.bias is None else out + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, stats={self.stats}"


NORM_CHOICES = ("task_bn", "group", "none")


def make_norm(
    kind: str, channels: int, groups: int = 8, *, eps: float = 1e-5, affine: str = "gamma_beta", stats: str = "batch"
) -> nn.Module:
    """Build a norm layer by name: ``task_bn``, ``group`` (GroupNorm) or ``none``. ``eps``, ``affine``
    (:data:`NORM_AFFINES`) and ``stats`` (:data:`NORM_STATS`) apply to ``task_bn``; ``group`` takes ``eps`` and
    only the ``gamma_beta`` affine and ``batch`` statistics."""
    if kind == "task_bn":
        return TaskBatchNorm(channels, eps=eps, affine=affine, stats=stats)
    if stats != "batch":
        raise ValueError(f"norm stats {stats!r} is only available for task_bn, not norm {kind!r}")
    if kind == "group":
        if channels % groups:
            raise ValueError(f"GroupNorm needs channels ({channels}) divisible by groups ({groups})")
        if affine != "gamma_beta":
            raise ValueError(f"norm affine {affine!r} is only available for task_bn; GroupNorm has gamma and beta")
        return nn.GroupNorm(groups, channels, eps=eps)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORM_CHOICES}")


def norm_parameters_of(model: nn.Module) -> set[str]:
    """Names of the parameters of the model's norm layers (TaskBatchNorm, GroupNorm and fused norms)."""
    kinds = (TaskBatchNorm, nn.GroupNorm, *FUSED_NORM_TYPES)
    return {
        f"{path}.{name}" if path else name
        for path, module in model.named_modules()
        if isinstance(module, kinds)
        for name, _ in module.named_parameters(recurse=False)
    }


def find_fused_norms(model: nn.Module) -> list[tuple[str, str]]:
    """Return ``(module path, class name)`` of every fused norm layer in ``model``."""
    return [
        (name or "<root>", type(module).__name__)
        for name, module in model.named_modules()
        if isinstance(module, FUSED_NORM_TYPES)
    ]
