"""The MAML Conv4 and MLP few-shot models, each with an N-way linear head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from meta.models.norms import TaskBatchNorm, make_norm

DOWNSAMPLE_CHOICES = ("stride", "maxpool")


CONV_IMPLS = ("native", "unfold")


class TaskConv2d(nn.Conv2d):
    """``nn.Conv2d`` with a choice of implementation, same parameters and same math.

    ``impl="native"`` calls ``F.conv2d``. ``impl="unfold"`` writes the convolution as
    ``unfold`` + matmul: under ``vmap`` over tasks with per-task weights it becomes a batched
    matmul (and its gradients too), instead of the grouped convolution that the native
    batching rule produces, whose backward and double backward are slow on CPU.
    ``impl`` is an attribute (``native`` by default), set per model with :func:`set_conv_impl`.
    """

    impl: str = "native"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "native":
            return super().forward(x)
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("impl='unfold' supports plain zero-padded convolutions with groups=1")
        batch, _, height, width = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        out = torch.einsum("ok,bkl->bol", self.weight.flatten(1), cols)
        out = rearrange(out, "b o (h w) -> b o h w", h=out_h, w=out_w)
        return out if self.bias is None else out + rearrange(self.bias, "o -> 1 o 1 1")


def set_conv_impl(model: nn.Module, impl: str) -> nn.Module:
    """Set every :class:`TaskConv2d` of ``model`` to ``impl`` (``native`` or ``unfold``)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {CONV_IMPLS}")
    for module in model.modules():
        if isinstance(module, TaskConv2d):
            module.impl = impl
    return model


class ConvBlock(nn.Module):
    """3x3 conv, norm, ReLU, then 2x downsampling by stride or max-pool."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str, downsample: str, norm_options: dict | None = None
    ) -> None:
        super().__init__()
        if downsample not in DOWNSAMPLE_CHOICES:
            raise ValueError(f"unknown downsample {downsample!r}; choose one of {DOWNSAMPLE_CHOICES}")
        stride = 2 if downsample == "stride" else 1
        self.conv = TaskConv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = make_norm(norm, out_channels, **(norm_options or {}))
        self.pool = nn.MaxPool2d(2) if downsample == "maxpool" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.norm(self.conv(x))))


class Conv4(nn.Module):
    """Four conv blocks with 64 filters and an N-way linear head.

    ``downsample="stride"`` is MAML's Omniglot network (strided convolutions,
    features averaged over space before the head by default, or flattened with
    ``head_input="flatten"``: Reptile's 2x2x64 = 256 features); ``"maxpool"``
    is the MAML++/ProtoNets variant (padded convolutions, 2x2 max-pool,
    always flattened). ``norm_options`` go to :func:`make_norm` (``eps``, ``affine``).
    """

    def __init__(
        self,
        ways: int,
        in_channels: int = 1,
        hidden: int = 64,
        norm: str = "task_bn",
        downsample: str = "stride",
        image_size: int = 28,
        norm_options: dict | None = None,
        head_input: str | None = None,
    ) -> None:
        super().__init__()
        if head_input is None:  # each variant's own: MAML's spatial mean, the max-pool network's flattening
            head_input = "mean" if downsample == "stride" else "flatten"
        if head_input not in ("mean", "flatten") or (downsample == "maxpool" and head_input != "flatten"):
            raise ValueError(f"head_input={head_input!r}: the strided Conv4 takes mean or flatten, the max-pool "
                             f"Conv4 flatten")
        channels = [in_channels, hidden, hidden, hidden, hidden]
        self.features = nn.Sequential(
            *(ConvBlock(channels[i], channels[i + 1], norm, downsample, norm_options) for i in range(4))
        )
        self.downsample, self.head_input = downsample, head_input
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2 if downsample == "stride" else side // 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for four downsampling blocks")
        self.embedding_dim = hidden if head_input == "mean" else hidden * side * side
        self.head = nn.Linear(self.embedding_dim, ways)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the head: ``[batch, embedding_dim]``."""
        h = self.features(x)
        return h.mean(dim=(2, 3)) if self.head_input == "mean" else h.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class MLP(nn.Module):
    """MAML's fully connected network: 256-128-64-64 hidden units, norm, ReLU, N-way head.
    ``norm_options`` go to :func:`make_norm` (``eps``, ``affine``)."""

    def __init__(
        self,
        ways: int,
        in_features: int = 28 * 28,
        hidden: tuple[int, ...] = (256, 128, 64, 64),
        norm: str = "task_bn",
        norm_options: dict | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), make_norm(norm, h, **(norm_options or {})), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.embedding_dim = width
        self.head = nn.Linear(width, ways)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the head: ``[batch, embedding_dim]``."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


INIT_SCHEMES = ("xavier", "maml", "pytorch04")


@torch.no_grad()
def initialize(model: nn.Module, generator: torch.Generator, scheme: str = "xavier") -> nn.Module:
    """Re-draw every weight from ``generator``; zero biases, unit norm scales, zero norm shifts.

    ``xavier``: Glorot-uniform conv and linear weights. ``maml``: cbfinn/maml's initializers, by model:
    the conv models (``construct_conv_weights``, maml.py:L185-L208) draw conv weights Glorot-uniform
    (``xavier_initializer_conv2d``, the same fans as PyTorch's for a ``[out, in, k, k]`` kernel) and the
    output weights from ``tf.random_normal``, standard deviation 1 (maml.py:L206); the MLP
    (``construct_fc_weights``, maml.py:L168-L177) draws every weight, the output's too, from
    ``tf.truncated_normal(stddev=0.01)``, a normal cut at two standard deviations. Biases are zero in both
    (``tf.zeros``). ``pytorch04``: PyTorch 0.4's (and earlier) default ``reset_parameters``, which ProtoNets'
    code ran (jakesnell/prototypical-networks README L20, protonets/models/few_shot.py L70-71 with the layers'
    defaults): conv and linear weights and biases uniform in ``+-1/sqrt(fan_in)``, batch-norm scales uniform in
    ``[0, 1)`` (``_BatchNorm.reset_parameters``' ``weight.data.uniform_()``, replaced by ones in PyTorch 1.2) and
    shifts zero. Deterministic given the generator, and no global RNG is touched.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")
    mlp = isinstance(model, MLP)
    head = getattr(model, "head", None)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and scheme == "pytorch04":
            bound = 1.0 / module.weight[0].numel() ** 0.5  # 1 / sqrt(fan_in)
            module.weight.uniform_(-bound, bound, generator=generator)
            if module.bias is not None:
                module.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier" or (isinstance(module, nn.Conv2d) and not mlp):
                nn.init.xavier_uniform_(module.weight, generator=generator)
            elif mlp:
                nn.init.trunc_normal_(module.weight, std=0.01, a=-0.02, b=0.02, generator=generator)
            elif module is head:
                nn.init.normal_(module.weight, std=1.0, generator=generator)
            else:
                raise ValueError(f"init scheme 'maml' has no rule for {type(module).__name__} layers of "
                                 f"{type(model).__name__}")
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, (nn.GroupNorm, TaskBatchNorm)):
            if module.weight is not None and scheme == "pytorch04" and isinstance(module, TaskBatchNorm):
                module.weight.uniform_(0.0, 1.0, generator=generator)
            elif module.weight is not None:
                module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()
    return model
