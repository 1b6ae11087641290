"""Build samplers, learners and rules from a config."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from meta.algorithms import ALGORITHMS
from meta.data import ClassPool, TaskSampler, load_mnist, load_omniglot, synthetic_pool
from meta.learner import MetaLearner
from meta.models import build_model, norm_parameters_of
from meta.rules import RULES, InnerRule, build_rule, first_order, masked

SPLITS = ("train", "val", "test")
#: the former name of :data:`meta.algorithms.ALGORITHMS` (``LEARNER_CLASSES[algorithm].supported_drivers()`` works)
LEARNER_CLASSES = ALGORITHMS


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


@contextlib.contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """Allow or forbid TF32 in cuDNN convolutions and CUDA matmuls (PyTorch's process-wide flags) while the block
    runs, then restore what they were. CPU computations do not read these flags."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` or ``float64``."""
    return {"float32": torch.float32, "float64": torch.float64}[name]


def load_pool(data: DictConfig, split: str) -> ClassPool:
    """The class pool of one split, as the data config describes it."""
    dataset, protocol = data.dataset, data.protocol
    if split == "test":
        dataset = data.test_dataset or dataset
        protocol = data.test_protocol or protocol
    if dataset == "synthetic":
        offset = SPLITS.index(split)
        return synthetic_pool(data.synthetic_classes, data.synthetic_drawings, data.image_size, seed=1000 + offset,
                              channels=data.channels)
    if dataset == "miniimagenet":
        from meta.data.miniimagenet import load_miniimagenet

        return load_miniimagenet(data.root, split, image_size=data.image_size, cache_dir=data.cache_dir)
    if dataset == "omniglot":
        return load_omniglot(
            data.root,
            split,
            protocol=protocol,
            image_size=data.image_size,
            rotation=data.rotation,
            rotations=tuple(data.rotations),
            rotate_splits=tuple(data.rotate_splits),
            invert=data.invert,
            cache_dir=data.cache_dir,
            download=data.download,
            resample=data.resample,
        )
    if dataset == "mnist":
        return load_mnist(data.root, split, protocol=protocol, image_size=data.image_size, cache_dir=data.cache_dir)
    raise ValueError(f"unknown dataset {dataset!r}")


def build_sampler(cfg: DictConfig, split: str, device: torch.device) -> TaskSampler:
    """The task sampler of one split on ``device`` (for training, from a fixed pool with ``data.task_pool``)."""
    task = cfg.task
    ways, shots, queries = task.ways, task.shots, task.queries
    if split == "train":
        ways, shots = task.train_ways or ways, task.train_shots or shots
    if split == "val":
        ways, queries = task.val_ways or ways, task.val_queries or queries
    if split == "test":
        queries = task.test_queries or queries
    try:
        if split == "train":  # a fixed pool of training tasks (MAML's and iMAML's code)
            pooled = {"task_pool": cfg.data.task_pool, "task_pool_seed": cfg.data.task_pool_seed,
                      "task_pool_order": cfg.data.task_pool_order}
        else:
            pooled = {}
        pool = load_pool(cfg.data, split)
        if pool.image_shape[0] != cfg.data.channels:
            raise ValueError(f"its images have {pool.image_shape[0]} channel(s), but data.channels="
                             f"{cfg.data.channels}; set data.channels={pool.image_shape[0]}")
        return TaskSampler(pool, ways, shots, queries, device=device, **pooled)
    except ValueError as error:
        raise ValueError(f"{split} split: {error}") from None


def build_samplers(cfg: DictConfig, device: torch.device) -> dict[str, TaskSampler]:
    """Train, validation and test task samplers on ``device``."""
    return {split: build_sampler(cfg, split, device) for split in SPLITS}


def build_learner(cfg: DictConfig, dtype: torch.dtype, device: torch.device) -> MetaLearner:
    """Model (weights drawn from ``cfg.seed``) and inner rule composed into ``cfg.algorithm``'s learner."""
    model = build_model_from_config(cfg, torch.Generator().manual_seed(cfg.seed))
    learner = ALGORITHMS[cfg.algorithm].build(cfg, model, build_inner_rule(cfg)).to(device=device, dtype=dtype)
    learner.set_iteration(0, cfg.train.iterations)  # schedules follow the new dtype and device
    return learner


def build_model_from_config(cfg: DictConfig, generator: torch.Generator | None) -> torch.nn.Module:
    """The ``model:`` section's network for ``task.ways`` classes; weights drawn from ``generator`` by
    ``model.init`` (None: PyTorch's default init, for a skeleton whose parameter names are all that matters)."""
    return build_model(
        cfg.model.name,
        cfg.task.ways,
        norm=cfg.model.norm,
        in_channels=cfg.data.channels,
        image_size=cfg.data.image_size,
        generator=generator,
        norm_eps=cfg.model.norm_eps,
        norm_affine=cfg.model.norm_affine,
        init=cfg.model.init,
        conv4_head=cfg.model.conv4_head,
        norm_stats=cfg.model.norm_stats,
        padding=cfg.model.padding,
        activation=cfg.model.activation,
        activation_slope=cfg.model.activation_slope,
        filters=cfg.model.filters,
    )


def build_optimizer(cfg: DictConfig, learner: MetaLearner) -> torch.optim.Optimizer:
    """The outer optimizer over ``learner.parameters()``: Adam (default; epsilon ``train.adam_eps``) or plain SGD
    (Reptile).
    With ``train.cuda_graph``, Adam keeps its state and learning rate in device tensors (``capturable``)."""
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(learner.parameters(), lr=cfg.train.meta_lr)
    eps = cfg.train.adam_eps
    if cfg.train.cuda_graph:
        device = next(learner.parameters()).device
        lr = torch.tensor(cfg.train.meta_lr, device=device)
        return torch.optim.Adam(learner.parameters(), lr=lr, eps=eps, capturable=True)
    return torch.optim.Adam(learner.parameters(), lr=cfg.train.meta_lr, eps=eps)


def meta_lr_at(cfg: DictConfig, step: int) -> float:
    """The outer learning rate at iteration ``step`` under ``train.lr_schedule``. With ``train.epoch_iterations``
    (E) it is read at the first iteration of ``step``'s epoch: cosine is then torch's CosineAnnealingLR with
    ``T_max = iterations / E`` epochs, stepped once per epoch, as HowToTrainYourMAMLPytorch runs it
    (few_shot_learning_system.py L70-71 ``T_max=total_epochs``, L345-346 ``scheduler.step(epoch=int(epoch))``)."""
    if cfg.train.epoch_iterations is not None:
        step -= step % cfg.train.epoch_iterations
    start, end, t = cfg.train.meta_lr, cfg.train.min_meta_lr, step / cfg.train.iterations
    if cfg.train.lr_schedule == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * t)) / 2
    if cfg.train.lr_schedule == "linear":
        return start + (end - start) * t
    if cfg.train.lr_schedule == "step":
        return start * cfg.train.lr_step_factor ** (step // cfg.train.lr_step_every)
    return start


def build_inner_rule(cfg: DictConfig, test: bool = False) -> InnerRule:
    """The training rule, or the test-time one (``inner.test_lr``) with ``test=True``.

    ``inner.learnable_lr`` goes to every rule factory that takes a ``learnable`` argument (sgd, momentum), so
    ``false`` means a fixed step size for all of them (config validation refuses ``true`` for the others)."""
    lr = cfg.inner.lr
    if test and cfg.inner.test_lr is not None:  # validate() refuses it with inner.learnable_lr
        lr = cfg.inner.test_lr
    kwargs = {"lr": lr, **OmegaConf.to_container(cfg.inner.options, resolve=True)}
    if "learnable" in inspect.signature(RULES[cfg.inner.rule]).parameters:  # validate() refused it elsewhere
        kwargs["learnable"] = cfg.inner.learnable_lr
    rule = build_rule(cfg.inner.rule, **kwargs)
    if not cfg.inner.adapt_norm:
        with torch.device("meta"):  # parameter names only: nothing is allocated or drawn
            frozen = norm_parameters_of(build_model_from_config(cfg, None))
        rule = masked(rule, lambda name: name not in frozen, label="frozen_norm")
    return first_order(rule) if cfg.inner.first_order and not rule.first_order else rule


def check_test_rule(cfg: DictConfig, learner: MetaLearner, test_rule: InnerRule) -> None:
    """Refuse an ``inner.test_lr`` that would change nothing: one step of the test-time rule from the learner's
    parameters must differ from one step of the training rule (it does not where the rule takes its step size
    from meta-learned tensors, such as Meta-SGD's or MAML++'s LSLR). No-op when ``inner.test_lr`` is null."""
    if cfg.inner.test_lr is None or cfg.inner.test_lr == cfg.inner.lr:
        return
    if learner.rule is None:
        raise ValueError(f"inner.test_lr={cfg.inner.test_lr} has no effect on algorithm={cfg.algorithm}: it has no "
                         f"inner loop; leave inner.test_lr null")
    params, rule_params, _ = learner.functional_state()
    fast = {k: v.detach() for k, v in params.items() if learner.rule.adapts(k)}
    shape = (1,) if learner.rule.per_sample else ()  # per-sample rules take [samples, *shape] gradients
    grads = {k: torch.ones(shape + v.shape, dtype=v.dtype, device=v.device) for k, v in fast.items()}
    rule_params = {k: v.detach() for k, v in rule_params.items()}
    updates = [rule.update(grads, rule.init(fast), fast, rule_params, 0)[0] for rule in (learner.rule, test_rule)]
    if updates[0].keys() == updates[1].keys() and all(torch.equal(updates[0][k], updates[1][k]) for k in updates[0]):
        raise ValueError(f"inner.test_lr={cfg.inner.test_lr} has no effect on rule {learner.rule.name!r}: its step "
                         f"size comes from meta-learned tensors ({', '.join(sorted(rule_params)) or 'none'}); "
                         f"leave inner.test_lr null")


def test_inner_steps(cfg: DictConfig) -> int:
    """Inner steps at validation and test time (``inner.test_steps``, else the training count)."""
    return cfg.inner.steps if cfg.inner.test_steps is None else cfg.inner.test_steps
