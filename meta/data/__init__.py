"""Data sets, class splits and vectorized few-shot task sampling.

Public API::

    resolve_data_root, resolve_cache_dir      # where data is read / caches are written
    ClassPool, synthetic_pool                 # one split's classes as one uint8 tensor
    load_omniglot, load_mnist                 # real data sets -> ClassPool
    TaskBatch, TaskSampler, evaluation_tasks  # N-way K-shot episodes
"""

from meta.data.errors import DataError
from meta.data.mnist import MNIST_PROTOCOLS, load_mnist
from meta.data.omniglot import OFFICIAL_COUNTS, OmniglotCounts, load_omniglot, read_omniglot
from meta.data.paths import resolve_cache_dir, resolve_data_root
from meta.data.pool import ClassPool, synthetic_pool
from meta.data.sampler import TaskBatch, TaskIndices, TaskSampler, evaluation_tasks
from meta.data.splits import load_split

__all__ = [
    "MNIST_PROTOCOLS",
    "OFFICIAL_COUNTS",
    "ClassPool",
    "DataError",
    "OmniglotCounts",
    "TaskBatch",
    "TaskIndices",
    "TaskSampler",
    "evaluation_tasks",
    "load_mnist",
    "load_omniglot",
    "load_split",
    "read_omniglot",
    "resolve_cache_dir",
    "resolve_data_root",
    "synthetic_pool",
]
