"""Model core: few-shot networks and their functional (dict-of-tensors) view."""

import torch
from torch import nn

from meta.models.functional import (
    Params,
    buffers_of,
    detached,
    functional_forward,
    global_norm,
    parameters_of,
    relative_error,
)
from meta.models.networks import CONV_IMPLS, MLP, Conv4, TaskConv2d, conv_impl, initialize, set_conv_impl
from meta.models.norms import TaskBatchNorm, find_fused_norms, make_norm


def build_model(
    name: str,
    ways: int,
    *,
    norm: str = "task_bn",
    in_channels: int = 1,
    image_size: int = 28,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build a model by name: ``conv4`` (strided, MAML), ``conv4_maxpool`` (MAML++/ProtoNets) or ``mlp``.

    With a ``generator`` the weights are drawn from it (:func:`initialize`); without one, PyTorch's
    default initialization draws from the global RNG.
    """
    if name == "conv4":
        model = Conv4(ways, in_channels, norm=norm, downsample="stride", image_size=image_size)
    elif name == "conv4_maxpool":
        model = Conv4(ways, in_channels, norm=norm, downsample="maxpool", image_size=image_size)
    elif name == "mlp":
        model = MLP(ways, in_features=in_channels * image_size * image_size, norm=norm)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of conv4, conv4_maxpool, mlp")
    return model if generator is None else initialize(model, generator)


__all__ = [
    "CONV_IMPLS",
    "TaskConv2d",
    "set_conv_impl",
    "conv_impl",
    "MLP",
    "Conv4",
    "Params",
    "TaskBatchNorm",
    "buffers_of",
    "build_model",
    "detached",
    "find_fused_norms",
    "functional_forward",
    "global_norm",
    "initialize",
    "make_norm",
    "parameters_of",
    "relative_error",
]
