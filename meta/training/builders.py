"""Build samplers, learners and rules from a config."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from meta.data import ClassPool, TaskSampler, load_mnist, load_omniglot, synthetic_pool
from meta.learner import MetaLearner
from meta.models import build_model
from meta.rules import InnerRule, build_rule

SPLITS = ("train", "val", "test")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


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
        return synthetic_pool(data.synthetic_classes, data.synthetic_drawings, data.image_size, seed=1000 + offset)
    if dataset == "omniglot":
        return load_omniglot(
            data.root,
            split,
            protocol=protocol,
            image_size=data.image_size,
            rotations=tuple(data.rotations),
            rotate_splits=tuple(data.rotate_splits),
            cache_dir=data.cache_dir,
            download=data.download,
            resample=data.resample,
        )
    if dataset == "mnist":
        return load_mnist(data.root, split, protocol=protocol, image_size=data.image_size, cache_dir=data.cache_dir)
    raise ValueError(f"unknown dataset {dataset!r}")


def build_sampler(cfg: DictConfig, split: str, device: torch.device) -> TaskSampler:
    """The task sampler of one split on ``device``."""
    queries = cfg.task.test_queries or cfg.task.queries if split == "test" else cfg.task.queries
    try:
        return TaskSampler(load_pool(cfg.data, split), cfg.task.ways, cfg.task.shots, queries, device=device)
    except ValueError as error:
        raise ValueError(f"{split} split: {error}") from None


def build_samplers(cfg: DictConfig, device: torch.device) -> dict[str, TaskSampler]:
    """Train, validation and test task samplers on ``device``."""
    return {split: build_sampler(cfg, split, device) for split in SPLITS}


def build_learner(cfg: DictConfig, dtype: torch.dtype, device: torch.device) -> MetaLearner:
    """Model (weights drawn from ``cfg.seed``) and inner rule wrapped in a ``MetaLearner``."""
    generator = torch.Generator().manual_seed(cfg.seed)
    channels = 1
    model = build_model(
        cfg.model.name,
        cfg.task.ways,
        norm=cfg.model.norm,
        in_channels=channels,
        image_size=cfg.data.image_size,
        generator=generator,
    )
    rule = build_inner_rule(cfg)
    return MetaLearner(model, rule, inner_steps=cfg.inner.steps).to(device=device, dtype=dtype)


def build_inner_rule(cfg: DictConfig, test: bool = False) -> InnerRule:
    """The training rule, or the test-time one (``inner.test_lr``) with ``test=True``."""
    lr = cfg.inner.lr
    if test and cfg.inner.test_lr is not None:
        if cfg.inner.learnable_lr:
            raise ValueError("inner.test_lr cannot override a learnable learning rate; leave it null")
        lr = cfg.inner.test_lr
    kwargs = {"lr": lr, "first_order": cfg.inner.first_order}
    if cfg.inner.rule == "sgd":
        kwargs["learnable"] = cfg.inner.learnable_lr
    return build_rule(cfg.inner.rule, **kwargs)


def test_inner_steps(cfg: DictConfig) -> int:
    """Inner steps at validation and test time (``inner.test_steps``, else the training count)."""
    return cfg.inner.steps if cfg.inner.test_steps is None else cfg.inner.test_steps
