"""Structured configuration (OmegaConf over dataclasses): unknown keys and wrong types fail at once.

Resolution order: the dataclass defaults below, then ``configs/base.yaml``,
then ``configs/<preset>.yaml``, then command-line ``key=value`` overrides.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A configuration key, value or preset is invalid."""


@dataclass
class DataConfig:
    dataset: str = "omniglot"  # omniglot | mnist | synthetic
    protocol: str = "vinyals"  # omniglot: vinyals | lake; mnist: within
    test_dataset: str | None = None  # null: same as dataset; mnist for the cross-domain protocol
    test_protocol: str | None = None  # null: same as protocol; cross_domain for Omniglot -> MNIST
    root: str | None = None  # null: $META_DATA_ROOT, else ~/.cache/meta/data
    cache_dir: str | None = None  # null: $META_CACHE_DIR, else ~/.cache/meta/cache
    image_size: int = 28
    resample: str = "lanczos"  # Omniglot resize filter: lanczos | maml (what PIL did to MAML's 1-bit PNGs)
    rotations: list[int] = field(default_factory=lambda: [0, 90, 180, 270])
    rotate_splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    download: bool = False  # opt-in download from the official URLs
    synthetic_classes: int = 64  # synthetic data set only
    synthetic_drawings: int = 20  # synthetic data set only


@dataclass
class TaskConfig:
    ways: int = 5
    shots: int = 1
    queries: int = 1  # per class, training and validation
    test_queries: int | None = None  # per class at test time; null: same as queries
    train_ways: int | None = None  # ways of training episodes (ProtoNets' 60-way training); null: same as ways
    train_shots: int | None = None  # shots per class in training episodes; null: same as shots


@dataclass
class ModelConfig:
    name: str = "conv4"  # conv4 (strided, MAML) | conv4_maxpool | mlp
    norm: str = "task_bn"  # task_bn | group | none
    # learnable tensors of task_bn: gamma_beta (scale and shift) | beta (shift only: tf.contrib.layers.batch_norm's
    # default scale=False, MAML's) | none. group norm: gamma_beta only
    norm_affine: str = "gamma_beta"
    norm_eps: float = 1e-5  # epsilon of task_bn and group (tf.contrib.layers.batch_norm, MAML's: 1e-3)
    # weight init, drawn from the seed's generator: xavier (Glorot-uniform conv and linear weights) | maml
    # (cbfinn/maml: conv Glorot-uniform and output weights normal with std 1; MLP truncated normal, std 0.01)
    init: str = "xavier"


@dataclass
class InnerConfig:
    rule: str = "sgd"  # a registered inner rule (meta.rules.RULES)
    lr: float = 0.4
    steps: int = 1
    first_order: bool = False
    learnable_lr: bool = False
    test_lr: float | None = None  # null: same as lr
    test_steps: int | None = None  # null: same as steps
    # inner mini-batch (Reptile): each step uses the next batch_size support examples of the (shuffled) support
    # set, cycling; null, or at least the support set's size: all of them
    batch_size: int | None = None
    # inner (support) loss: mean (of the per-example cross-entropy) | sum_over_shots (their sum divided by the
    # shots K, cbfinn/maml's xent: N times the mean on the full support set, so an SGD step of lr on it is a step
    # of N * lr on the mean). The query loss is always the mean. Per-sample rules (clipped_sgd) get each
    # sample's gradient times the same factor. algorithm maml, mamlpp and reptile
    loss_reduction: str = "mean"
    # false: the norm layers' parameters are meta-learned but not adapted in the inner loop (MAML: its batch-norm
    # variables are not in `weights`); the rule is masked to the other parameters (meta.rules.masked)
    adapt_norm: bool = True
    # extra keyword arguments of the rule factory (see its docstring), e.g. {clip: 1.0} for clipped_sgd,
    # {lslr: true, per_step_bn: true, steps: 5} for mamlpp, {beta1: 0.0} for adam
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    iterations: int = 60000
    meta_batch: int = 32
    meta_lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd (Reptile: SGD on initial - mean(adapted) is theta += lr * (phi - theta))
    lr_schedule: str = "constant"  # constant | cosine (MAML++) | linear (Reptile), from meta_lr to min_meta_lr
    min_meta_lr: float = 0.0  # end value of the cosine and linear schedules
    lr_step_every: int = 2000  # step schedule (ProtoNets): meta_lr times lr_step_factor every this many iterations
    lr_step_factor: float = 0.5
    chunk_size: int | None = None  # vmap chunk size (bounds memory); null: all tasks at once
    # CUDA only: replay each meta-step as a captured CUDA graph (meta/training/cuda_graph.py); same steps, less
    # launch overhead. algorithm maml or mamlpp, optimizer adam, any driver but loop_threads
    cuda_graph: bool = False
    log_every: int = 10
    val_every: int = 500
    val_tasks: int = 200
    checkpoint_every: int = 1000


@dataclass
class MAMLPlusPlusConfig:
    """algorithm=mamlpp only (LSLR and per-step BN are inner.options of the mamlpp rule)."""

    msl_iterations: int = 0  # multi-step loss, annealed over this many iterations, then last step only; 0: off
    first_order_iterations: int = 0  # derivative-order annealing: first order for this many iterations; 0: off


@dataclass
class IMAMLConfig:
    """algorithm=imaml only."""

    lam: float = 2.0  # proximal regularization lambda (Rajeswaran et al. 2019: 2.0)
    cg_steps: int = 5  # conjugate-gradient steps for the implicit meta-gradient (Rajeswaran et al. 2019: 5)
    test_lam: float | None = None  # lambda of the test-time adaptation; null: same as lam


@dataclass
class EvalConfig:
    tasks: int = 600
    batch_size: int = 50
    seed: int = 1234  # the test task set is a fixed function of this seed
    checkpoint: str = "best"  # best (highest validation accuracy) | last (the final model; MAML tests its latest)


@dataclass
class ReferenceConfig:
    accuracy: float | None = None  # the paper's number, in percent
    ci95: float | None = None
    source: str | None = None


@dataclass
class Config:
    preset: str | None = None
    # the learner: maml (MetaLearner with inner.rule: sgd, metasgd, anil, metacurvature, clipped_sgd, ...)
    # | mamlpp | reptile | imaml | protonets (meta/training/builders.py)
    algorithm: str = "maml"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | float64
    # auto: the fastest exact driver for the setting, timed on the first batch (recorded in checkpoints);
    # vmap | loop | vmap_autograd | loop_autograd | loop_threads pin one (all agree to rounding; tests: 1e-10, float64)
    driver: str = "auto"
    out_dir: str | None = None  # null: runs/<preset>-seed<seed>
    resume: bool = False
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mamlpp: MAMLPlusPlusConfig = field(default_factory=MAMLPlusPlusConfig)
    imaml: IMAMLConfig = field(default_factory=IMAMLConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)


CHOICES: dict[str, tuple[Any, ...]] = {
    "algorithm": ("maml", "mamlpp", "reptile", "imaml", "protonets"),
    "train.optimizer": ("adam", "sgd"),
    "train.lr_schedule": ("constant", "cosine", "linear", "step"),
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("float32", "float64"),
    "driver": ("auto", "vmap", "loop", "vmap_autograd", "loop_autograd", "loop_threads"),
    "data.dataset": ("omniglot", "mnist", "synthetic"),
    "model.name": ("conv4", "conv4_maxpool", "mlp"),
    "model.norm": ("task_bn", "group", "none"),
    "model.norm_affine": ("gamma_beta", "beta", "none"),
    "model.init": ("xavier", "maml"),
    "inner.loss_reduction": ("mean", "sum_over_shots"),
    "eval.checkpoint": ("best", "last"),
}

POSITIVE = ("task.ways", "task.shots", "task.queries", "train.iterations", "train.meta_batch", "train.log_every",
            "train.lr_step_every", "train.lr_step_factor",
            "train.val_every", "train.val_tasks", "train.checkpoint_every", "eval.tasks", "eval.batch_size",
            "data.image_size", "model.norm_eps")


def available_presets() -> list[str]:
    """Names of the presets in ``configs/`` (every yaml file except ``base``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base")


def _merge(base: DictConfig, other: Any, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        message = str(getattr(error, "msg", error)).splitlines()[0]
        raise ConfigError(f"{what}: {message}" + (f" (key: {key})" if key else "")) from None


def load_config(
    overrides: list[str] | None = None, preset: str | None = None, base: dict[str, Any] | None = None
) -> DictConfig:
    """Build the config: dataclass defaults, ``base.yaml``, the preset, then ``key=value`` overrides.

    With ``base`` (a saved run's config), that replaces ``base.yaml`` and the preset.
    """
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    preset_items = [o for o in overrides if o.split("=", 1)[0] == "preset"]
    if preset_items:
        preset = preset_items[-1].split("=", 1)[1]
    cfg = OmegaConf.structured(Config)
    if base is not None:
        cfg, preset = _merge(cfg, base, "saved config"), None
    else:
        cfg = _merge(cfg, OmegaConf.load(CONFIG_DIR / "base.yaml"), "configs/base.yaml")
    if preset:
        path = CONFIG_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(available_presets())}")
        cfg = _merge(cfg, OmegaConf.load(path), f"preset {preset}")
        cfg.preset = preset
    try:
        dotlist = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as error:
        raise ConfigError(f"bad override: {error}") from None
    cfg = _merge(cfg, dotlist, "command line")
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check values that types alone cannot: choices, positive sizes, known rules."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {choices}")
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {OmegaConf.select(cfg, key)}")
    for key in ("task.test_queries", "task.train_ways", "task.train_shots", "inner.batch_size"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be positive (or null), got {value}")
    if cfg.task.train_ways not in (None, cfg.task.ways) and cfg.algorithm != "protonets":
        raise ConfigError(f"task.train_ways={cfg.task.train_ways} differs from task.ways={cfg.task.ways}, but "
                          f"algorithm={cfg.algorithm} adapts a {cfg.task.ways}-way linear head, which fixes the ways; "
                          f"only protonets (no head) can train on other ways")
    if cfg.inner.batch_size is not None and cfg.algorithm in ("imaml", "protonets"):
        raise ConfigError(f"inner.batch_size applies to the inner loops of maml, mamlpp and reptile, not "
                          f"algorithm={cfg.algorithm}")
    if cfg.model.norm_affine != "gamma_beta" and cfg.model.norm != "task_bn":
        raise ConfigError(f"model.norm_affine={cfg.model.norm_affine} needs model.norm=task_bn (got "
                          f"{cfg.model.norm}); set model.norm_affine=gamma_beta")
    if cfg.inner.loss_reduction != "mean" and cfg.algorithm in ("imaml", "protonets"):
        raise ConfigError(f"inner.loss_reduction={cfg.inner.loss_reduction} applies to the inner loops of maml, "
                          f"mamlpp and reptile, not algorithm={cfg.algorithm}; set inner.loss_reduction=mean")
    if (cfg.inner.rule == "mamlpp" and cfg.inner.options.get("per_step_bn", True)
            and cfg.model.norm_affine != "gamma_beta"):
        raise ConfigError(f"inner.rule=mamlpp with per-step batch norm finds norm layers by their gamma; "
                          f"model.norm_affine={cfg.model.norm_affine} has none: set model.norm_affine=gamma_beta")
    if cfg.inner.steps < 0 or (cfg.inner.test_steps is not None and cfg.inner.test_steps < 0):
        raise ConfigError("inner.steps and inner.test_steps must be >= 0")
    if cfg.train.cuda_graph:
        from meta.training.cuda_graph import GRAPHABLE_DRIVERS

        if cfg.device == "cpu":
            raise ConfigError("train.cuda_graph=true needs device=cuda (or auto on a machine with CUDA)")
        supported = cfg.algorithm in ("maml", "mamlpp") and cfg.train.optimizer == "adam"
        if not supported or cfg.driver not in GRAPHABLE_DRIVERS:
            raise ConfigError(f"train.cuda_graph=true supports algorithm maml or mamlpp with train.optimizer=adam "
                              f"and any driver but loop_threads, not algorithm={cfg.algorithm}, "
                              f"train.optimizer={cfg.train.optimizer}, driver={cfg.driver}")
    from meta.rules import RULES

    if cfg.inner.rule not in RULES:
        raise ConfigError(f"inner.rule={cfg.inner.rule!r} is not a registered rule: {sorted(RULES)}")
    import inspect

    accepted = set(inspect.signature(RULES[cfg.inner.rule]).parameters)
    unknown = sorted(set(cfg.inner.options) - accepted)
    if unknown:
        raise ConfigError(f"inner.options {unknown} are not arguments of rule {cfg.inner.rule!r}: {sorted(accepted)}")


def config_hash(cfg: DictConfig) -> str:
    """A short hash of the settings that define a run (everything but paths and run control)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in ("out_dir", "resume", "progress", "device"):
        data.pop(key, None)
    data["data"].pop("root", None)
    data["data"].pop("cache_dir", None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(data)).encode()).hexdigest()[:12]
