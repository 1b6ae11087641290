"""Model core: few-shot networks and their functional (dict-of-tensors) view."""

from meta.models.functional import (
    Params,
    buffers_of,
    detached,
    functional_forward,
    global_norm,
    parameters_of,
    relative_error,
)
from meta.models.networks import MLP, Conv4
from meta.models.norms import TaskBatchNorm, find_fused_norms, make_norm


def build_model(
    name: str, ways: int, *, norm: str = "task_bn", in_channels: int = 1, image_size: int = 28
):
    """Build a model by name: ``conv4`` (strided, MAML), ``conv4_maxpool`` (MAML++/ProtoNets) or ``mlp``."""
    if name == "conv4":
        return Conv4(ways, in_channels, norm=norm, downsample="stride", image_size=image_size)
    if name == "conv4_maxpool":
        return Conv4(ways, in_channels, norm=norm, downsample="maxpool", image_size=image_size)
    if name == "mlp":
        return MLP(ways, in_features=in_channels * image_size * image_size, norm=norm)
    raise ValueError(f"unknown model {name!r}; choose one of conv4, conv4_maxpool, mlp")


__all__ = [
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
    "make_norm",
    "parameters_of",
    "relative_error",
]
