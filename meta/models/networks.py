"""The model core: the functional view of a model (parameters and buffers as dicts of tensors), the norm layers
that stay exact under ``torch.func`` transforms, and the MAML Conv4 and MLP few-shot models, each with an N-way
linear head."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch._C import _functorch
from torch.func import functional_call

from meta.types import Params

# ---- the functional view: a model as a pure function of dicts of tensors ------------------------------------

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


# ---- norm layers ----------------------------------------------------------------------------------------------
# Normalization layers that are exact under ``torch.func`` transforms.
#
# ``TaskBatchNorm`` is batch normalization with per-batch statistics. Under
# ``vmap`` over tasks it is written from ``mean``/``var`` primitives, so each task
# is normalized with its own statistics (transductive, as in MAML) and second-order
# gradients are exact. By default it keeps no running statistics, so it has no buffers and
# nothing is updated in place; ``stats="running"`` (ProtoNets) is nn.BatchNorm2d's behaviour, outside transforms.

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
        # under_vmap() reads functorch's transform stack, state that no argument shows. It must exist: a vmapped
        # call looks like a plain one from here, and the fused kernel's second-order gradients are wrong under
        # vmap (pytorch/functorch#534). It picks between two implementations of the same math (tests/test_core.py
        # checks they agree), never between different results; use_fused_kernel=False turns the fast path off.
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


# ---- the few-shot networks --------------------------------------------------------------------------------------

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


#: activation after each hidden layer's norm: ``relu`` (MAML's, and every model's default) or ``leaky_relu``
#: (MAML++'s: ``F.leaky_relu`` with PyTorch's default negative slope 0.01, AntreasAntoniou/HowToTrainYourMAMLPytorch
#: meta_neural_network_architectures.py L383, L426)
ACTIVATIONS = ("relu", "leaky_relu")
#: PyTorch's default negative slope of ``F.leaky_relu``, the one MAML++ uses
LEAKY_RELU_SLOPE = 0.01


class Activation(nn.Module):
    """The hidden layers' nonlinearity by name (:data:`ACTIVATIONS`); ``slope`` is leaky_relu's negative slope.
    Parameter-free, so it changes no parameter name and every driver maps it as it maps ``torch.relu``."""

    def __init__(self, kind: str = "relu", slope: float = LEAKY_RELU_SLOPE) -> None:
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"unknown activation {kind!r}; choose one of {ACTIVATIONS}")
        if kind == "relu" and slope != LEAKY_RELU_SLOPE:
            raise ValueError(f"a negative slope ({slope}) applies to activation leaky_relu only, not relu")
        if not 0.0 <= slope < 1.0:
            raise ValueError(f"leaky_relu slope must be in [0, 1), got {slope}")
        self.kind, self.slope = kind, slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if self.kind == "relu" else F.leaky_relu(x, self.slope)

    def extra_repr(self) -> str:
        return self.kind if self.kind == "relu" else f"{self.kind}, slope={self.slope}"


#: padding of the 3x3 convolutions: ``symmetric`` (one pixel on every side) or ``tf_same`` (TensorFlow's
#: ``'SAME'``: the total padding ``max((ceil(n / s) - 1) * s + 3 - n, 0)`` split with the extra pixel at the bottom
#: and right, so a stride-2 convolution of an even side pads only there; the same output sizes as ``symmetric``)
PADDINGS = ("symmetric", "tf_same")


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """``x`` (``[..., H, W]``) zero-padded as TensorFlow's ``'SAME'`` pads it before a ``kernel`` x ``kernel``
    convolution of ``stride`` (tensorflow/python/ops/nn_ops.py; the extra pixel of an odd total goes after)."""

    def split(n: int) -> tuple[int, int]:
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        return total // 2, total - total // 2

    top, bottom = split(x.shape[-2])
    left, right = split(x.shape[-1])
    return F.pad(x, (left, right, top, bottom))


class ConvBlock(nn.Module):
    """3x3 conv, norm, activation (ReLU by default), then 2x downsampling by stride or max-pool. ``padding``:
    :data:`PADDINGS`; ``activation``: :class:`Activation` (``relu`` or ``leaky_relu`` with ``slope``)."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str, downsample: str, norm_options: dict | None = None,
        padding: str = "symmetric", activation: str = "relu", slope: float = LEAKY_RELU_SLOPE,
    ) -> None:
        super().__init__()
        if downsample not in DOWNSAMPLE_CHOICES:
            raise ValueError(f"unknown downsample {downsample!r}; choose one of {DOWNSAMPLE_CHOICES}")
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r}; choose one of {PADDINGS}")
        stride = 2 if downsample == "stride" else 1
        self.tf_same = padding == "tf_same"
        self.conv = TaskConv2d(in_channels, out_channels, 3, stride=stride, padding=0 if self.tf_same else 1)
        self.norm = make_norm(norm, out_channels, **(norm_options or {}))
        self.activation = Activation(activation, slope)
        self.pool = nn.MaxPool2d(2) if downsample == "maxpool" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            x = tf_same_pad(x, 3, self.conv.stride[0])
        return self.pool(self.activation(self.norm(self.conv(x))))


class Conv4(nn.Module):
    """Four conv blocks with 64 filters and an N-way linear head.

    ``downsample="stride"`` is MAML's Omniglot network (strided convolutions,
    features averaged over space before the head by default, or flattened with
    ``head_input="flatten"``: Reptile's 2x2x64 = 256 features); ``"maxpool"``
    is the MAML++/ProtoNets variant (padded convolutions, 2x2 max-pool,
    always flattened). ``norm_options`` go to :func:`make_norm` (``eps``, ``affine``); ``padding``: :data:`PADDINGS`;
    ``activation`` and ``slope``: :class:`Activation`.
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
        padding: str = "symmetric",
        activation: str = "relu",
        slope: float = LEAKY_RELU_SLOPE,
    ) -> None:
        super().__init__()
        if head_input is None:  # each variant's own: MAML's spatial mean, the max-pool network's flattening
            head_input = "mean" if downsample == "stride" else "flatten"
        if head_input not in ("mean", "flatten") or (downsample == "maxpool" and head_input != "flatten"):
            raise ValueError(f"head_input={head_input!r}: the strided Conv4 takes mean or flatten, the max-pool "
                             f"Conv4 flatten")
        channels = [in_channels, hidden, hidden, hidden, hidden]
        self.features = nn.Sequential(
            *(ConvBlock(channels[i], channels[i + 1], norm, downsample, norm_options, padding, activation, slope)
              for i in range(4))
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
    ``norm_options`` go to :func:`make_norm` (``eps``, ``affine``); ``activation``, ``slope``: :class:`Activation`."""

    def __init__(
        self,
        ways: int,
        in_features: int = 28 * 28,
        hidden: tuple[int, ...] = (256, 128, 64, 64),
        norm: str = "task_bn",
        norm_options: dict | None = None,
        activation: str = "relu",
        slope: float = LEAKY_RELU_SLOPE,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), make_norm(norm, h, **(norm_options or {})), Activation(activation, slope)]
            width = h
        self.features = nn.Sequential(*layers)
        self.embedding_dim = width
        self.head = nn.Linear(width, ways)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the head: ``[batch, embedding_dim]``."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


INIT_SCHEMES = ("xavier", "maml", "imaml", "pytorch04")


@torch.no_grad()
def initialize(model: nn.Module, generator: torch.Generator, scheme: str = "xavier") -> nn.Module:
    """Re-draw every weight from ``generator``; zero biases, unit norm scales, zero norm shifts.

    ``xavier``: Glorot-uniform conv and linear weights. ``maml``: cbfinn/maml's initializers, by model:
    the conv models (``construct_conv_weights``, maml.py:L185-L208) draw conv weights Glorot-uniform
    (``xavier_initializer_conv2d``, the same fans as PyTorch's for a ``[out, in, k, k]`` kernel) and the
    output weights from ``tf.random_normal``, standard deviation 1 (maml.py:L206); the MLP
    (``construct_fc_weights``, maml.py:L168-L177) draws every weight, the output's too, from
    ``tf.truncated_normal(stddev=0.01)``, a normal cut at two standard deviations. Biases are zero in both
    (``tf.zeros``). ``imaml``: aravindr93/imaml_dev's ``make_conv_network`` (implicit_maml/learner_model.py
    L222-228): conv and linear weights Glorot-uniform with gain 1.73, biases uniform on [0, 0.05].
    ``pytorch04``: PyTorch 0.4's (and earlier) default ``reset_parameters``, which ProtoNets'
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
        if isinstance(module, (nn.Conv2d, nn.Linear)) and scheme == "imaml":
            nn.init.xavier_uniform_(module.weight, gain=1.73, generator=generator)
            if module.bias is not None:
                nn.init.uniform_(module.bias, 0.0, 0.05, generator=generator)
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and scheme == "pytorch04":
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
