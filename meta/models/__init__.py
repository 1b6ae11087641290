"""Model core: few-shot networks and their functional (dict-of-tensors) view."""

import torch
from torch import nn

from meta.models.networks import (
    ACTIVATIONS,
    CONV_IMPLS,
    INIT_SCHEMES,
    LEAKY_RELU_SLOPE,
    MLP,
    NORM_AFFINES,
    NORM_STATS,
    PADDINGS,
    Conv4,
    Params,
    TaskBatchNorm,
    TaskConv2d,
    buffers_of,
    detached,
    find_fused_norms,
    functional_forward,
    global_norm,
    initialize,
    make_norm,
    norm_parameters_of,
    parameters_of,
    relative_error,
    set_conv_impl,
)


def build_model(
    name: str,
    ways: int,
    *,
    norm: str = "task_bn",
    in_channels: int = 1,
    image_size: int = 28,
    generator: torch.Generator | None = None,
    norm_eps: float = 1e-5,
    norm_affine: str = "gamma_beta",
    init: str = "xavier",
    conv4_head: str = "mean",
    norm_stats: str = "batch",
    padding: str = "symmetric",
    activation: str = "relu",
    activation_slope: float = LEAKY_RELU_SLOPE,
    filters: int = 64,
) -> nn.Module:
    """Build a model by name: ``conv4`` (strided, MAML), ``conv4_maxpool`` (MAML++/ProtoNets) or ``mlp``.

    ``conv4_head`` is what ``conv4``'s head reads: ``mean`` (the spatial mean of its 64 features, MAML) or
    ``flatten`` (all 2x2x64 = 256 at 28 pixels, Reptile); the other models take only the default. ``padding`` of
    the conv models' 3x3 convolutions (:data:`PADDINGS`): ``symmetric`` (one pixel on every side, PyTorch's) or
    ``tf_same`` (TensorFlow's ``'SAME'``, which the strided convolutions of cbfinn/maml and supervised-reptile used);
    the MLP takes only the default. ``activation`` (:data:`ACTIVATIONS`) follows every hidden layer's norm:
    ``relu`` (MAML's) or ``leaky_relu`` with negative slope ``activation_slope`` (MAML++'s ``F.leaky_relu``, 0.01).
    ``filters`` is the conv models' width, every block's output channels: 64 (MAML's Omniglot, ProtoNets), 32 (MAML's
    mini-ImageNet: ``--num_filters=32``), 48 (MAML++'s mini-ImageNet); ``in_channels`` 3 for colour images. The max-pool
    Conv4 flattens its last feature maps: 5x5xfilters at 84 pixels (MAML's mini-ImageNet head, maml.py L203).

    ``norm_eps``, ``norm_affine`` (``gamma_beta``, ``beta``, ``none``) and ``norm_stats`` (``batch``, or
    ``running``: nn.BatchNorm2d's running statistics, used in eval mode) shape the norm layers. With a
    ``generator`` the weights are drawn from it by the ``init`` scheme (:func:`initialize`: ``xavier`` or
    ``maml``); without one, PyTorch's default initialization draws from the global RNG.
    """
    options = {"eps": norm_eps, "affine": norm_affine, "stats": norm_stats}
    act = {"activation": activation, "slope": activation_slope}
    if name != "conv4" and conv4_head != "mean":
        raise ValueError(f"conv4_head={conv4_head!r} applies to the conv4 model only, not {name!r}")
    if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
        raise ValueError(f"filters must be a positive integer, got {filters!r}")
    if name == "mlp" and filters != 64:
        raise ValueError(f"filters={filters} applies to the conv models only, not {name!r} (its widths are fixed)")
    if name == "mlp" and padding != "symmetric":
        raise ValueError(f"padding={padding!r} applies to the conv models only, not {name!r}")
    if name == "conv4":
        model = Conv4(ways, in_channels, hidden=filters, norm=norm, downsample="stride", image_size=image_size,
                      norm_options=options, head_input=conv4_head, padding=padding, **act)
    elif name == "conv4_maxpool":
        model = Conv4(ways, in_channels, hidden=filters, norm=norm, downsample="maxpool", image_size=image_size,
                      norm_options=options, padding=padding, **act)
    elif name == "mlp":
        model = MLP(ways, in_features=in_channels * image_size * image_size, norm=norm, norm_options=options, **act)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of conv4, conv4_maxpool, mlp")
    return model if generator is None else initialize(model, generator, init)


__all__ = [
    "ACTIVATIONS",
    "LEAKY_RELU_SLOPE",
    "CONV_IMPLS",
    "INIT_SCHEMES",
    "NORM_AFFINES",
    "NORM_STATS",
    "PADDINGS",
    "norm_parameters_of",
    "TaskConv2d",
    "set_conv_impl",
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
