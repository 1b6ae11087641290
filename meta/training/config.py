"""Structured configuration (OmegaConf over dataclasses): unknown keys and wrong types fail at once.

Resolution order: the dataclass defaults below, then ``configs/base.yaml``, then the presets a preset extends
(``extends: <preset>``, the farthest ancestor first), then ``configs/<preset>.yaml``, then command-line
``key=value`` overrides.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from meta.data.sampler import TASK_POOL_ORDERS
from meta.models.networks import ACTIVATIONS, LEAKY_RELU_SLOPE
from meta.package_files import shipped_path

#: the presets: configs/ of the checkout, or the copy a wheel ships (meta.package_files)
CONFIG_DIR = shipped_path("configs")


class ConfigError(ValueError):
    """A configuration key, value or preset is invalid."""


@dataclass
class DataConfig:
    dataset: str = "omniglot"  # omniglot | mnist | synthetic | miniimagenet (docs/data.md: where to get each)
    # omniglot: maml_random | protonets_vinyals | protonets_vinyals_trainval | reptile | imaml | mamlpp | lake
    # (meta/data/splits.py; the former "vinyals" is maml_random); mnist: within
    protocol: str = "maml_random"
    test_dataset: str | None = None  # null: same as dataset; mnist for the cross-domain protocol
    test_protocol: str | None = None  # null: same as protocol; cross_domain for Omniglot -> MNIST
    root: str | None = None  # null: $META_DATA_ROOT, else ~/.cache/meta/data
    cache_dir: str | None = None  # null: $META_CACHE_DIR, else ~/.cache/meta/cache
    image_size: int = 28  # side of the square input images, in pixels
    resample: str = "maml"  # Omniglot resize: maml (what PIL did to the papers' 1-bit PNGs: nearest) | lanczos
    invert: bool = True  # Omniglot: bright strokes on black (MAML, ProtoNets); false: the PNGs' black on white
    # Omniglot rotation semantics: as_class (each character x angle is a class: Santoro, ProtoNets, Reptile) |
    # per_class (distinct characters, one random angle per class and task: MAML, MAML++, iMAML) | none
    rotation: str = "per_class"
    rotations: list[int] = field(default_factory=lambda: [0, 90, 180, 270])  # rotation angles in degrees (see rotation)
    rotate_splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])  # splits that rotate at all
    download: bool = False  # opt-in download from the official URLs
    # training tasks from a fixed pool of this many task definitions (classes, labels, drawings), drawn once from
    # task_pool_seed; each batch picks pool tasks uniformly with replacement, with fresh example orders and rotations
    # (iMAML's code: >= 200,000 pre-generated tasks). null: every training task fresh. Validation and test: fresh
    task_pool: int | None = None
    task_pool_seed: int = 0  # the seed the task pool is drawn from (independent of seed, as the code's one file)
    # how batches pick tasks from data.task_pool: random (uniformly with replacement: iMAML's code) | in_order (the
    # pool read in order from the step's first task, wrapping around: MAML's code reads its 200,000 task list so)
    task_pool_order: str = "random"
    # channels of the input images: 1 (omniglot, mnist) | 3 (miniimagenet); the model's input channels, and the
    # synthetic data set's (synthetic: any count, e.g. 3 at image_size 84 for mini-ImageNet's shape)
    channels: int = 1
    synthetic_classes: int = 64  # synthetic data set only
    synthetic_drawings: int = 20  # synthetic data set only


@dataclass
class TaskConfig:
    ways: int = 5  # N: classes per task (validation and test; training too unless train_ways)
    shots: int = 1  # K: support examples per class (validation and test; training too unless train_shots)
    queries: int = 1  # per class, training and validation
    test_queries: int | None = None  # per class at test time; null: same as queries
    train_ways: int | None = None  # ways of training episodes (ProtoNets' 60-way training); null: same as ways
    train_shots: int | None = None  # shots per class in training episodes; null: same as shots
    # ways of validation episodes; null: same as ways. protonets only (the MAML family adapts an N-way head).
    # ProtoNets validates on --data.test_way 5 (prototypical-networks protonets/data/omniglot.py L87-100)
    val_ways: int | None = None
    # queries per class in validation episodes; null: same as queries (ProtoNets: --data.test_query 15)
    val_queries: int | None = None


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
    # | imaml (aravindr93/imaml_dev: Glorot-uniform with gain 1.73, biases uniform on [0, 0.05])
    # | pytorch04 (PyTorch <= 0.4's defaults, ProtoNets' code: weights and biases U(+-1/sqrt(fan_in)), BN scale U(0, 1))
    init: str = "xavier"
    # what conv4's head reads: mean (the spatial mean of the last 64 feature maps: cbfinn/maml maml.py forward_conv
    # reduce_mean) | flatten (all 2x2x64 = 256 values at 28 pixels: supervised-reptile models.py L24). conv4 only
    conv4_head: str = "mean"
    # padding of the conv models' 3x3 convolutions: symmetric (one pixel on every side, PyTorch's padding=1) |
    # tf_same (TensorFlow's 'SAME', which cbfinn/maml's and supervised-reptile's strided convolutions used: at an
    # even side the stride-2 convolution pads one pixel at the bottom and right only). conv4 and conv4_maxpool
    padding: str = "symmetric"
    # nonlinearity after each hidden layer's norm: relu (MAML's: cbfinn/maml utils.py L26 conv_block tf.nn.relu) |
    # leaky_relu (MAML++'s F.leaky_relu: AntreasAntoniou/HowToTrainYourMAMLPytorch
    # meta_neural_network_architectures.py L383, L426). Every model
    activation: str = "relu"
    # negative slope of leaky_relu (PyTorch's F.leaky_relu default, MAML++'s: 0.01); relu takes only the default
    activation_slope: float = 0.01
    # statistics of task_bn: batch (each batch's own, in training and at test: transductive, MAML) | running
    # (nn.BatchNorm2d's: batch statistics in training, which update running averages with momentum 0.1 and the
    # unbiased variance; validation and test normalize with the running averages: ProtoNets' model.eval(),
    # jakesnell/prototypical-networks scripts/predict/few_shot/eval.py L16). running: algorithm=protonets and
    # driver=loop_autograd only (the update is in place, task after task)
    norm_stats: str = "batch"
    # output channels of every conv block of conv4 and conv4_maxpool: 64 (MAML's Omniglot, ProtoNets) | 32 (MAML's
    # mini-ImageNet: cbfinn/maml main.py L17 --num_filters=32) | 48 (MAML++'s mini-ImageNet). mlp: 64 only
    filters: int = 64


@dataclass
class InnerConfig:
    rule: str = "sgd"  # a registered inner rule (meta.rules.RULES)
    lr: float = 0.4  # inner step size
    steps: int = 1  # inner steps in training
    first_order: bool = False  # drop second derivatives (first-order MAML)
    learnable_lr: bool = False  # meta-learn the inner step size (rules with a learnable option: sgd, momentum)
    test_lr: float | None = None  # null: same as lr
    test_steps: int | None = None  # null: same as steps
    # inner mini-batch (Reptile): each step uses the next batch_size support examples of the (shuffled) support
    # set, cycling; null, or at least the support set's size: all of them
    batch_size: int | None = None
    # inner mini-batch at validation and test (supervised-reptile's --eval-batch); null: same as batch_size.
    # algorithm maml, mamlpp and reptile
    test_batch_size: int | None = None
    # inner (support) loss: mean (of the per-example cross-entropy) | sum_over_shots (their sum divided by the
    # shots K, cbfinn/maml's xent: N times the mean on the full support set, so an SGD step of lr on it is a step
    # of N * lr on the mean). The query loss is always the mean. Per-sample rules (clipped_sgd) get each
    # sample's gradient times the same factor. | sum (over the batch: batch times the mean; supervised-reptile's
    # minimize of the per-example loss vector, models.py L27-30). algorithm maml, mamlpp and reptile
    loss_reduction: str = "mean"
    # algorithm=reptile with a rule that has state (adam): carry the rule's state (Adam's moments and step count)
    # from task to task and across meta-iterations instead of starting it afresh per task; validation and test
    # tasks each start from the carried state (supervised-reptile reptile.py L24-26: only trainable variables are
    # restored between tasks). Tasks then run in order: driver=loop only. Saved in checkpoints
    persistent_state: bool = False
    # false: the norm layers' parameters are meta-learned but not adapted in the inner loop (MAML: its batch-norm
    # variables are not in `weights`); the rule is masked to the other parameters (meta.rules.masked)
    adapt_norm: bool = True
    # extra keyword arguments of the rule factory (see its docstring), e.g. {clip: 1.0} for clipped_sgd,
    # {lslr: true, per_step_bn: true, steps: 5} for mamlpp, {beta1: 0.0} for adam
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    iterations: int = 60000  # outer (meta) iterations
    meta_batch: int = 32  # tasks per outer step
    meta_lr: float = 1e-3  # outer learning rate
    optimizer: str = "adam"  # adam | sgd (Reptile: SGD on initial - mean(adapted) is theta += lr * (phi - theta))
    adam_eps: float = 1e-8  # epsilon of the outer Adam (torch's default; iMAML's code: 1e-3); optimizer adam only
    lr_schedule: str = "constant"  # constant | cosine (MAML++) | linear (Reptile), from meta_lr to min_meta_lr
    min_meta_lr: float = 0.0  # end value of the cosine and linear schedules
    lr_step_every: int = 2000  # step schedule (ProtoNets): meta_lr times lr_step_factor every this many iterations
    lr_step_factor: float = 0.5  # step schedule: the factor applied every lr_step_every iterations
    chunk_size: int | None = None  # vmap chunk size (bounds memory); null: all tasks at once
    # CUDA only: replay each meta-step as a captured CUDA graph (meta/training/cuda_graph.py); same steps, less
    # launch overhead. algorithm maml or mamlpp, optimizer adam, driver vmap_autograd (the one checked on a GPU)
    cuda_graph: bool = False
    log_every: int = 10  # iterations between metrics.jsonl lines
    val_every: int = 500  # iterations between validations
    val_tasks: int = 200  # validation tasks each time
    checkpoint_every: int = 1000  # iterations between checkpoints
    # schedules advance once per epoch of this many iterations: the meta-lr schedule (train.lr_schedule) and
    # MAML++'s multi-step-loss weights and derivative-order switch are piecewise constant, read at the epoch's
    # first iteration (HowToTrainYourMAMLPytorch steps CosineAnnealingLR(T_max=total_epochs) and its loss
    # weights once per epoch of total_iter_per_epoch=500: few_shot_learning_system.py L70-71, L83-103, L346);
    # null: every iteration
    epoch_iterations: int | None = None
    # stop once more than this many validations in a row have not lowered the best validation loss
    # (jakesnell/prototypical-networks scripts/train/few_shot/train.py L98-114: wait > patience); results.json
    # records the best step. null: train all iterations
    early_stop_patience: int | None = None


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
    # paper: the inner rule runs on the proximal objective support + lam/2 |phi - theta|^2 | code (the official
    # aravindr93/imaml_dev): the rule runs on the support loss alone, then one more update on the gradient of
    # lam/2 |phi - theta|^2 (the pull-back); cg_steps <= 1 means the query gradient, no CG (meta/algorithms/imaml.py)
    formulation: str = "paper"
    # the CG operator is (1 + regu_coef) v + Hv / (lam + lam_damping); regu_coef 0: the paper's. Official code: 1.0
    regu_coef: float = 0.0
    lam_damping: float = 0.0  # see regu_coef; 0: the paper's v + Hv / lam. Official code: 10 (learner_model.py L143)
    cg_tol: float = 0.0  # CG stops updating once the squared residual r.r < cg_tol (official code: 1e-10); 0: never


@dataclass
class EvalConfig:
    tasks: int = 600  # test tasks (a fixed set, a function of eval.seed)
    batch_size: int = 50  # test tasks evaluated per vmapped batch (memory; results do not depend on it)
    seed: int = 1234  # the test task set is a fixed function of this seed
    # best (highest validation accuracy) | last (the final model; MAML tests its latest) | ensemble (the
    # ensemble_size checkpoints of highest validation accuracy, kept in out_dir as top_step*.pt during training;
    # their query logits are averaged per task and the argmax is the prediction: MAML++'s experiment_builder.py
    # L247-290; a run with fewer validations uses all of them, and says so)
    checkpoint: str = "best"
    ensemble_size: int = 5  # eval.checkpoint=ensemble: how many top validation checkpoints (MAML++: 5, L371)
    # true: the query set is predicted as one batch (batch statistics over the queries: MAML, "Reptile +
    # Transduction"); false: each query in a batch of the support set plus that query alone (supervised-reptile
    # reptile.py L129-133). Validation and test; model.norm=task_bn, algorithm maml, mamlpp, reptile or imaml
    transductive: bool = True


@dataclass
class LogConfig:
    # also write metrics.jsonl's scalars and the meta learning rate as TensorBoard events to out_dir/tensorboard
    # (torch.utils.tensorboard; needs the optional tensorboard package: pip install tensorboard)
    tensorboard: bool = False


@dataclass
class DistConfig:
    """Runs launched by torchrun on several processes (meta/training/distributed.py); ignored on one process."""

    # seconds a rank waits in a collective (and at start-up) for the others before it fails: a rank that died or
    # hangs ends the run within about this time (torchrun itself stops the others at once when one exits)
    timeout_s: float = 300.0


@dataclass
class ReferenceConfig:
    accuracy: float | None = None  # the paper's number, in percent
    ci95: float | None = None  # the paper's ± (95% interval), in percent
    source: str | None = None  # where the paper's number comes from


@dataclass
class Config:
    preset: str | None = None  # a preset name from configs/ (see the list above)
    # the learner: maml (MetaLearner with inner.rule: sgd, metasgd, anil, metacurvature, clipped_sgd, ...)
    # | mamlpp | reptile | imaml | protonets (meta/training/builders.py)
    algorithm: str = "maml"
    seed: int = 0  # model initialization and the training task stream
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | float64
    # CUDA: let cuDNN convolutions and CUDA matmuls compute in TF32 (10-bit mantissa; PyTorch's own default for
    # convolutions). false: full float32, what the papers' GPUs computed; TF32 moves a second-order meta-gradient
    # by about 7% relative (experiments/benchmarks/h100). Set for the run and restored after it; no effect on a CPU
    tf32: bool = False
    # auto: the fastest exact driver for the setting, timed on the first batch (recorded in checkpoints);
    # vmap | loop | vmap_autograd | loop_autograd | loop_threads pin one (all agree to rounding; tests: 1e-10, float64)
    driver: str = "auto"
    out_dir: str | None = None  # null: runs/<preset>-seed<seed>
    # continue the run in out_dir with the config saved in its checkpoint; only RESUME_SAFE_KEYS may differ
    resume: bool = False
    overwrite: bool = False  # replace the run already in out_dir (never implied)
    progress: bool = True  # show the progress bar (loss, accuracy, it/s)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mamlpp: MAMLPlusPlusConfig = field(default_factory=MAMLPlusPlusConfig)
    imaml: IMAMLConfig = field(default_factory=IMAMLConfig)
    log: LogConfig = field(default_factory=LogConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    dist: DistConfig = field(default_factory=DistConfig)


CHOICES: dict[str, tuple[Any, ...]] = {
    "algorithm": ("maml", "mamlpp", "reptile", "imaml", "protonets"),
    "train.optimizer": ("adam", "sgd"),
    "train.lr_schedule": ("constant", "cosine", "linear", "step"),
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("float32", "float64"),
    "driver": ("auto", "vmap", "loop", "vmap_autograd", "loop_autograd", "loop_threads"),
    "data.dataset": ("omniglot", "mnist", "synthetic", "miniimagenet"),
    "data.resample": ("lanczos", "maml"),
    "data.rotation": ("as_class", "per_class", "none"),
    "data.task_pool_order": TASK_POOL_ORDERS,
    "model.name": ("conv4", "conv4_maxpool", "mlp"),
    "model.norm": ("task_bn", "group", "none"),
    "model.norm_affine": ("gamma_beta", "beta", "none"),
    "model.init": ("xavier", "maml", "imaml", "pytorch04"),
    "model.conv4_head": ("mean", "flatten"),
    "model.padding": ("symmetric", "tf_same"),
    "model.activation": ACTIVATIONS,
    "model.norm_stats": ("batch", "running"),
    "inner.loss_reduction": ("mean", "sum_over_shots", "sum"),
    "eval.checkpoint": ("best", "last", "ensemble"),
    "imaml.formulation": ("paper", "code"),
}

@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: ``low`` to ``high`` (``None``: unbounded), each end included unless
    ``*_open``. A key that may be null (no value) is checked only when it has one."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low == 0 and self.low_open and self.high is None:
            return "positive"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high}{')' if self.high_open else ']'}"


#: > 0 (for an integer: >= 1)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
#: a torch.Generator seed (manual_seed takes 64 bits and wraps negative ones; 63 leave room for eval.seed + 1)
SEED = Range(0, 2**63 - 1)

#: The range of every numeric key (float keys must also be finite): validate() refuses a value outside it before
#: anything is built or written, naming the key, the value and the range. Null keys are checked when set.
RANGES: dict[str, Range] = {
    "seed": SEED,
    "data.image_size": POSITIVE,
    "data.task_pool": POSITIVE,
    "data.task_pool_seed": SEED,
    "data.channels": POSITIVE,
    "data.synthetic_classes": POSITIVE,
    "data.synthetic_drawings": POSITIVE,
    "task.ways": POSITIVE,
    "task.shots": POSITIVE,
    "task.queries": POSITIVE,
    "task.test_queries": POSITIVE,
    "task.train_ways": POSITIVE,
    "task.train_shots": POSITIVE,
    "task.val_ways": POSITIVE,
    "task.val_queries": POSITIVE,
    "model.norm_eps": POSITIVE,
    "model.filters": POSITIVE,
    "model.activation_slope": Range(0, 1, high_open=True),
    "inner.lr": NON_NEGATIVE,
    "inner.steps": NON_NEGATIVE,
    "inner.test_lr": NON_NEGATIVE,
    "inner.test_steps": NON_NEGATIVE,
    "inner.batch_size": POSITIVE,
    "inner.test_batch_size": POSITIVE,
    "train.iterations": POSITIVE,
    "train.meta_batch": POSITIVE,
    "train.meta_lr": POSITIVE,
    "train.adam_eps": POSITIVE,
    "train.min_meta_lr": NON_NEGATIVE,
    "train.lr_step_every": POSITIVE,
    "train.lr_step_factor": POSITIVE,
    "train.chunk_size": POSITIVE,
    "train.log_every": POSITIVE,
    "train.val_every": POSITIVE,
    "train.val_tasks": POSITIVE,
    "train.checkpoint_every": POSITIVE,
    "train.epoch_iterations": POSITIVE,
    "train.early_stop_patience": NON_NEGATIVE,
    "mamlpp.msl_iterations": NON_NEGATIVE,
    "mamlpp.first_order_iterations": NON_NEGATIVE,
    "imaml.lam": NON_NEGATIVE,
    "imaml.cg_steps": NON_NEGATIVE,
    "imaml.test_lam": NON_NEGATIVE,
    "imaml.regu_coef": NON_NEGATIVE,
    "imaml.lam_damping": NON_NEGATIVE,
    "imaml.cg_tol": NON_NEGATIVE,
    "eval.tasks": POSITIVE,
    "eval.batch_size": POSITIVE,
    "eval.seed": SEED,
    "eval.ensemble_size": POSITIVE,
    "dist.timeout_s": POSITIVE,
    "reference.accuracy": Range(0, 100),
    "reference.ci95": NON_NEGATIVE,
}


def check_ranges(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first numeric key that is not finite or outside its :data:`RANGES`."""
    for key, value in flatten(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number")
    for key, allowed in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in allowed:
            nullable = " (or null)" if _may_be_null(key) else ""
            raise ConfigError(f"{key} must be {allowed}{nullable}, got {value}")


def _may_be_null(key: str) -> bool:
    """Whether ``key``'s field is declared ``... | None``."""
    *sections, name = key.split(".")
    cls: Any = Config
    for section in sections:
        cls = type(getattr(cls(), section))
    return "None" in str({f.name: f.type for f in fields(cls)}[name])


def available_presets() -> list[str]:
    """Names of the presets in ``configs/`` (every yaml file except ``base``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base")


#: Keys that may differ from the saved config when a run is resumed: they change neither the steps already taken
#: nor the ones to come, only paths, run control, logging and the final test. ``train.iterations`` is one of them
#: unless a ``cosine`` or ``linear`` meta-lr schedule depends on it.
RESUME_SAFE_KEYS = (
    "out_dir", "resume", "overwrite", "progress", "device", "data.root", "data.cache_dir", "data.download",
    "train.iterations", "train.log_every", "train.val_every", "train.checkpoint_every",
    "eval.tasks", "eval.batch_size", "eval.checkpoint", "log.tensorboard", "dist.timeout_s",
)
#: Keys scripts/evaluate.py can apply to a saved run: where data and outputs are, the device, the test tasks and
#: test-time adaptation. Everything else defines how the run was trained and cannot change afterwards.
EVAL_KEYS = (
    "device", "dtype", "tf32", "driver", "progress", "data.root", "data.cache_dir", "data.download",
    "data.test_dataset", "data.test_protocol", "task.shots", "task.test_queries", "train.chunk_size", "inner.test_lr",
    "inner.test_steps", "inner.test_batch_size", "imaml.test_lam", "eval.tasks", "eval.batch_size", "eval.seed",
    "eval.checkpoint", "eval.ensemble_size", "eval.transductive",
)
#: The keys a paper's reference number belongs to: change one and the reference no longer applies.
REFERENCE_PROTOCOL = ("data.dataset", "data.protocol", "data.test_dataset", "data.test_protocol", "task.ways",
                      "task.shots")
_PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a config as dotted keys; lists and empty dicts are values)."""
    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=True)
    if not isinstance(data, dict) or (not data and prefix):
        return {prefix[:-1]: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def config_differences(saved: Any, new: Any) -> list[str]:
    """Dotted keys whose values differ between two configs (dicts or DictConfigs)."""
    a, b = flatten(saved), flatten(new)
    return sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))


def with_defaults(saved: Any) -> DictConfig:
    """A saved run's config with the keys it lacks filled in from the structured defaults: a key absent from it did
    not exist when the run started, so the run ran as that key's default (new keys default to earlier behaviour)."""
    return OmegaConf.merge(OmegaConf.structured(Config), saved)


def check_resume_config(saved: Any, new: DictConfig) -> list[str]:
    """Raise :class:`ConfigError` listing the keys that differ from the saved config and are not safe to change on
    resume (:data:`RESUME_SAFE_KEYS`); return the safe ones that differ. Keys the saved config lacks compare as
    their defaults (:func:`with_defaults`)."""
    saved = with_defaults(saved)
    changed = config_differences(saved, new)
    safe = set(RESUME_SAFE_KEYS)
    if new.train.lr_schedule in ("cosine", "linear"):  # the schedule is a function of the total iterations
        safe.discard("train.iterations")
    if new.eval.checkpoint == "ensemble" and flatten(saved).get("eval.checkpoint") != "ensemble":
        safe.discard("eval.checkpoint")  # the top validation checkpoints are kept only from the start
    unsafe = [key for key in changed if key not in safe]
    if unsafe:
        old = flatten(saved)
        listed = ", ".join(f"{key}={old.get(key)!r} -> {OmegaConf.select(new, key)!r}" for key in unsafe)
        raise ConfigError(f"resume=true with a changed config: {listed}. A resumed run must go on as it started; "
                          f"only {', '.join(sorted(safe))} may change on resume. Drop these overrides, or start a "
                          f"new run in another out_dir")
    return changed


def check_eval_overrides(overrides: list[str]) -> None:
    """Raise :class:`ConfigError` naming command-line keys that cannot apply to a saved run (:data:`EVAL_KEYS`)."""
    keys = [item.split("=", 1)[0].lstrip("+~") for item in overrides]
    refused = [key for key in keys if key not in EVAL_KEYS and not any(k.startswith(key + ".") for k in EVAL_KEYS)]
    if refused:
        raise ConfigError(f"{', '.join(refused)} cannot apply to a saved run (they fix how it was trained, and the "
                          f"checkpoint holds its own config); evaluate.py accepts {', '.join(EVAL_KEYS)}")


def _preset_file(name: str, wanted_by: str | None = None) -> Path:
    """``configs/<name>.yaml``, or a :class:`ConfigError` naming the bad name (``wanted_by``: the preset whose
    ``extends:`` names it)."""
    what = f"preset {wanted_by}: extends: {name!r}" if wanted_by else f"preset={name!r}"
    if not isinstance(name, str) or not _PRESET_NAME.fullmatch(name) or name == "base":
        raise ConfigError(f"{what} is not a preset name: a preset is the name of a file in configs/ without .yaml, "
                          f"not a path; available: {', '.join(available_presets())}")
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{what}: unknown preset {name!r}; available: {', '.join(available_presets())}")
    return path


def preset_layers(preset: str) -> list[tuple[str, DictConfig]]:
    """The files a preset resolves from, the farthest ``extends:`` ancestor first, each without its ``extends``
    key; merged in this order over ``base.yaml`` they give the preset. Cycles and unknown parents are errors."""
    chain: list[tuple[str, DictConfig]] = []
    name: str | None = preset
    wanted_by = None
    while name is not None:
        if name in [seen for seen, _ in chain]:
            cycle = " -> ".join([*[seen for seen, _ in chain], name])
            raise ConfigError(f"preset {preset}: extends: makes a cycle ({cycle}); remove one of these extends: lines")
        layer = load_yaml_file(_preset_file(name, wanted_by), f"preset {name}")
        parent = layer.pop("extends", None)
        chain.append((name, layer))
        name, wanted_by = parent, name
    return chain[::-1]


def _yaml_problem(error: yaml.YAMLError, text: str) -> str:
    """One line for a YAML error: what went wrong, where, and the usual fix."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    if isinstance(error, yaml.constructor.ConstructorError) and "tag" in problem:
        fix = "YAML tags (!!python/..., !!binary, ...) are not accepted: write plain values"
    elif mark is not None and "\t" in (text.splitlines()[mark.line:mark.line + 1] or [""])[0]:
        fix = "YAML indents with spaces, not tabs: replace the tabs"
    else:
        fix = "fix the YAML syntax"
    return f"{problem}{where}; {fix}"


def load_yaml_file(path: Path, what: str) -> DictConfig:
    """A config layer from a YAML file (a preset, base.yaml), or a one-line :class:`ConfigError` naming the file:
    not UTF-8 text, a YAML error (tabs, tags such as ``!!python/...``), or not a mapping of keys."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what}: {path} is not UTF-8 text (byte {error.start}: {error.object[error.start]:#04x}); "
                          f"save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"{what}: cannot read {path}: {error.strerror}") from None
    try:
        layer = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except yaml.YAMLError as error:
        raise ConfigError(f"{what}: {path}: {_yaml_problem(error, text)}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{what}: {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{what}: {path} is a YAML {type(layer).__name__.removesuffix('Config').lower()}, not a "
                          f"mapping of keys: write one 'key: value' per line (sections as 'train:' then indented keys)")
    return layer


def _parse_overrides(overrides: list[str]) -> DictConfig:
    """The command line's ``key=value`` items as one config, or a one-line :class:`ConfigError` naming the item:
    bytes that are not UTF-8, or a value that is not plain YAML (a tag such as ``!!python/...``)."""
    for item in overrides:
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            shown = item.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise ConfigError(f"command line: '{shown}' is not UTF-8 text; pass keys and values (paths too) as "
                              f"UTF-8") from None
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as error:
            raise ConfigError(f"command line: {item!r}: {_yaml_problem(error, item.split('=', 1)[1])}") from None
        except OmegaConfBaseException as error:
            raise ConfigError(f"bad override: {str(error).splitlines()[0]}") from None
    return OmegaConf.from_dotlist(overrides)


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
        cfg = _merge(cfg, load_yaml_file(CONFIG_DIR / "base.yaml", "configs/base.yaml"), "configs/base.yaml")
    if preset:
        for name, layer in preset_layers(preset):
            cfg = _merge(cfg, layer, f"preset {name}")
        cfg.preset = preset
    dotlist = _parse_overrides(overrides)
    protocol = {key: OmegaConf.select(cfg, key) for key in REFERENCE_PROTOCOL}
    cfg = _merge(cfg, dotlist, "command line")
    changed = [key for key in REFERENCE_PROTOCOL if OmegaConf.select(cfg, key) != protocol[key]]
    reference_given = any(item.split("=", 1)[0].startswith("reference") for item in overrides)
    if changed and not reference_given and cfg.reference.accuracy is not None:
        # the paper's number belongs to the preset's protocol, not to this one
        cfg.reference = OmegaConf.structured(ReferenceConfig)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check values that types alone cannot: choices, positive sizes, known rules."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {choices}")
    check_ranges(cfg)
    if cfg.model.padding != "symmetric" and cfg.model.name == "mlp":
        raise ConfigError(f"model.padding={cfg.model.padding} applies to the conv models only, not model.name=mlp; "
                          f"leave model.padding=symmetric")
    if cfg.model.activation == "relu" and cfg.model.activation_slope != LEAKY_RELU_SLOPE:
        raise ConfigError(f"model.activation_slope={cfg.model.activation_slope} applies to model.activation=leaky_relu "
                          f"only; leave it at {LEAKY_RELU_SLOPE} with relu")
    if cfg.model.conv4_head != "mean" and cfg.model.name != "conv4":
        raise ConfigError(f"model.conv4_head={cfg.model.conv4_head} applies to model.name=conv4 only, not "
                          f"{cfg.model.name}; leave it at mean")
    if cfg.train.optimizer != "adam" and cfg.train.adam_eps != TrainConfig.adam_eps:
        raise ConfigError(f"train.adam_eps={cfg.train.adam_eps} applies to train.optimizer=adam only, not "
                          f"{cfg.train.optimizer}; leave it at {TrainConfig.adam_eps}")
    from meta.algorithms import ALGORITHMS

    algorithm = ALGORITHMS[cfg.algorithm]
    try:
        algorithm.check_config(cfg)  # the checks that belong to the algorithm live beside it
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _validate_data(cfg.data)
    if cfg.inner.persistent_state and cfg.algorithm != "reptile":
        raise ConfigError(f"inner.persistent_state=true applies to algorithm=reptile (its tasks adapt one after "
                          f"another), not algorithm={cfg.algorithm}; set inner.persistent_state=false")
    if not cfg.eval.transductive and (cfg.model.norm != "task_bn" or cfg.algorithm == "protonets"):
        raise ConfigError(f"eval.transductive=false predicts each query with the support set's batch statistics; with "
                          f"model.norm={cfg.model.norm} and algorithm={cfg.algorithm} that changes nothing or does not "
                          f"apply (it needs model.norm=task_bn and an adapted model: maml, mamlpp, reptile, imaml); "
                          f"leave eval.transductive=true")
    if cfg.model.norm_affine != "gamma_beta" and cfg.model.norm != "task_bn":
        raise ConfigError(f"model.norm_affine={cfg.model.norm_affine} needs model.norm=task_bn (got "
                          f"{cfg.model.norm}); set model.norm_affine=gamma_beta")
    if cfg.model.norm_stats != "batch" and (cfg.model.norm != "task_bn" or cfg.algorithm != "protonets"):
        raise ConfigError(f"model.norm_stats={cfg.model.norm_stats} needs model.norm=task_bn and algorithm=protonets "
                          f"(got {cfg.model.norm}, {cfg.algorithm}): the other algorithms adapt under torch.func "
                          f"transforms, which cannot update running statistics in place; set model.norm_stats=batch")
    if (cfg.inner.rule == "mamlpp" and cfg.inner.options.get("per_step_bn", True)
            and cfg.model.norm_affine != "gamma_beta"):
        raise ConfigError(f"inner.rule=mamlpp with per-step batch norm finds norm layers by their gamma; "
                          f"model.norm_affine={cfg.model.norm_affine} has none: set model.norm_affine=gamma_beta")
    if cfg.eval.checkpoint == "ensemble" and cfg.algorithm == "protonets":
        raise ConfigError("eval.checkpoint=ensemble averages the query logits of adapted models; algorithm=protonets "
                          "adapts none: use eval.checkpoint=best or last")
    drivers = algorithm.supported_drivers()
    if cfg.driver not in drivers:
        raise ConfigError(f"algorithm={cfg.algorithm} does not run on driver={cfg.driver}; choose one of {drivers}")
    if cfg.train.cuda_graph:
        from meta.training.cuda_graph import GRAPHABLE_DRIVERS

        if cfg.device == "cpu":
            raise ConfigError("train.cuda_graph=true needs device=cuda (or auto on a machine with CUDA)")
        supported = algorithm.cuda_graph and cfg.train.optimizer == "adam"
        if not supported or cfg.driver not in GRAPHABLE_DRIVERS:
            raise ConfigError(f"train.cuda_graph=true supports algorithm maml or mamlpp with train.optimizer=adam "
                              f"and driver={' or '.join(GRAPHABLE_DRIVERS)} (checked against eager steps on a GPU: "
                              f"experiments/benchmarks/h200), not algorithm={cfg.algorithm}, "
                              f"train.optimizer={cfg.train.optimizer}, driver={cfg.driver}")
    from meta.rules import RULES

    if cfg.inner.rule not in RULES:
        raise ConfigError(f"inner.rule={cfg.inner.rule!r} is not a registered rule: {sorted(RULES)}")
    import inspect

    accepted = set(inspect.signature(RULES[cfg.inner.rule]).parameters)
    unknown = sorted(set(cfg.inner.options) - accepted)
    if unknown:
        raise ConfigError(f"inner.options {unknown} are not arguments of rule {cfg.inner.rule!r}: {sorted(accepted)}")
    if cfg.model.norm == "task_bn" and cfg.algorithm != "protonets":
        try:
            rule = RULES[cfg.inner.rule](**cfg.inner.options)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"inner.rule={cfg.inner.rule} with inner.options={dict(cfg.inner.options)}: "
                              f"{error}") from None
        if rule.per_sample:
            raise ConfigError(f"inner.rule={cfg.inner.rule} takes per-sample gradients, which are undefined when "
                              f"model.norm=task_bn's batch statistics couple the samples; set model.norm=group "
                              f"or model.norm=none")
    if cfg.inner.test_lr is not None and cfg.inner.learnable_lr:
        raise ConfigError("inner.test_lr cannot override a learnable step size (inner.learnable_lr=true); leave null")
    if "learnable" in cfg.inner.options:
        raise ConfigError("set a learnable step size with inner.learnable_lr, not inner.options.learnable")
    if cfg.inner.learnable_lr and "learnable" not in accepted:
        raise ConfigError(f"inner.learnable_lr=true: rule {cfg.inner.rule!r} has no learnable-step-size option "
                          f"(its factory takes no 'learnable' argument); leave inner.learnable_lr false")


def _validate_data(data: DictConfig) -> None:
    """Omniglot protocol names (with the renamed ones), rotation angles and rotated splits."""
    from meta.data.splits import PROTOCOLS, RENAMED, SPLIT_NAMES

    for key, dataset in (("data.protocol", data.dataset), ("data.test_protocol", data.test_dataset or data.dataset)):
        value = OmegaConf.select(data, key.split(".", 1)[1])
        if dataset != "omniglot" or (key == "data.test_protocol" and value is None):
            continue
        if value in RENAMED:
            raise ConfigError(f"{key}={value!r} was renamed: the random 1100/100/423 character split is now "
                              f"{key}={RENAMED[value]} (the real Vinyals split is protonets_vinyals); for a run saved "
                              f"before the rename, pass {key}={RENAMED[value]} (same characters)")
        if value not in PROTOCOLS:
            raise ConfigError(f"{key}={value!r} is not an Omniglot protocol: {PROTOCOLS}")
    bad = [r for r in data.rotations if r not in (0, 90, 180, 270)]
    if bad or len(set(data.rotations)) != len(data.rotations):
        raise ConfigError(f"data.rotations={list(data.rotations)} must be distinct angles from [0, 90, 180, 270]")
    if data.task_pool_order != "random" and data.task_pool is None:
        raise ConfigError(f"data.task_pool_order={data.task_pool_order} reads a task pool, but data.task_pool is null; "
                          f"set data.task_pool (e.g. 200000) or leave data.task_pool_order=random")
    if data.download and data.dataset == "mnist":
        from meta.data.mnist import MNIST_SOURCE

        raise ConfigError(f"data.download=true fetches Omniglot only; MNIST is read from <data root>/MNIST/raw/: put "
                          f"{MNIST_SOURCE} there (docs/data.md), then leave data.download=false")
    unknown = [s for s in data.rotate_splits if s not in SPLIT_NAMES]
    if unknown:
        raise ConfigError(f"data.rotate_splits has unknown split(s) {unknown}; expected some of {list(SPLIT_NAMES)}")


def config_hash(cfg: DictConfig) -> str:
    """A short hash of the settings that define a run (everything but paths and run control)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in ("out_dir", "resume", "overwrite", "progress", "device", "log"):
        data.pop(key, None)
    data["data"].pop("root", None)
    data["data"].pop("cache_dir", None)
    data.pop("dist", None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(data)).encode()).hexdigest()[:12]
