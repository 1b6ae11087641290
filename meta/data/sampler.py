"""Vectorized N-way K-shot episode sampling from a ``ClassPool``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from einops import rearrange

from meta.data.pool import ClassPool
from meta.types import Task

# Tasks drawn per internal step in ``evaluation_tasks``; fixed so that the evaluation set
# does not depend on the caller's batch size.
_EVAL_CHUNK = 100
# Tasks drawn per internal step when a ``TaskSampler`` generates its ``task_pool`` (bounds the memory of the draw).
_POOL_CHUNK = 1000
#: How a sampler with a task pool picks its tasks: uniformly with replacement (iMAML's code) or in order (MAML's).
TASK_POOL_ORDERS = ("random", "in_order")


#: A batch of ``T`` tasks: ``support_x`` float ``[T, N*K, C, H, W]`` in [0, 1], ``support_y`` long ``[T, N*K]``
#: with labels 0..N-1, ``query_x`` and ``query_y`` likewise with ``N*Q`` examples.
TaskBatch = Task


class TaskIndices(NamedTuple):
    """Which pool entries make up a batch of tasks (all on the pool's device).

    ``classes[t, n]`` is the pool class that gets label ``n`` in task ``t``;
    ``drawings[t, n]`` holds its K support drawings followed by its Q query drawings;
    ``support_order``/``query_order`` permute the example positions within each task;
    ``rotations[t, n]`` indexes the pool's ``rotations``: the angle of every image of class
    ``n`` in task ``t`` (all zeros for a pool without rotations).
    """

    classes: torch.Tensor  # long [T, N]
    drawings: torch.Tensor  # long [T, N, K+Q]
    support_order: torch.Tensor  # long [T, N*K]
    query_order: torch.Tensor  # long [T, N*Q]
    rotations: torch.Tensor  # long [T, N]

    def slice(self, start: int, stop: int) -> TaskIndices:
        """Tasks ``start:stop``."""
        return TaskIndices(*(t[start:stop] for t in self))


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class TaskSampler:
    """Samples batches of N-way K-shot tasks with Q queries per class.

    The pool is moved to ``device`` once; every draw uses the explicit generator passed
    to ``sample`` (CPU or on the pool's device; indices are drawn on the generator's
    device and then moved). Class-to-label assignment is a fresh random permutation in
    every task, every class's drawings are sampled without replacement (support and
    query drawings are distinct), and, with ``shuffle=True``, example positions inside
    the support and query sets are shuffled too so position carries no label information.
    If the pool has several ``rotations``, every class of a task is shown at one of them,
    drawn uniformly per task and class (MAML's semantics: the N classes are N distinct
    pool classes, so two rotations of one character never share a task).

    With ``task_pool`` (iMAML's code: aravindr93/imaml_dev examples/README.md L7-L14 pre-generates at least
    200,000 tasks), tasks come from a fixed pool of that many task definitions (each task's classes with their
    labels, and its support and query drawings), drawn once at construction from a generator seeded with
    ``task_pool_seed``; every draw then picks pool tasks uniformly with replacement (omniglot_implicit_maml.py L98)
    and draws their example orders and rotations afresh, as the code's ``OmniglotFewShotDataset.__getitem__``
    redraws a task's rotations each time it is used (dataset.py L199).

    With ``task_pool_order="in_order"`` (MAML's code: cbfinn/maml data_generator.py L86-L101 lists 200,000 task
    definitions once, L104 reads them with ``string_input_producer(shuffle=False)``, cycling through the list, and
    L138-L143 redraw each task's rotations and example order on every read), a draw reads the pool in order: the
    ``num_tasks`` tasks from index ``first_task`` on, wrapping around at the end. ``first_task`` (the number of
    training tasks drawn before this batch) is the caller's; the sampler keeps no cursor.
    """

    def __init__(
        self,
        pool: ClassPool,
        ways: int,
        shots: int,
        queries: int,
        device: torch.device | str = "cpu",
        *,
        shuffle: bool = True,
        task_pool: int | None = None,
        task_pool_seed: int = 0,
        task_pool_order: str = "random",
    ) -> None:
        self.ways = _check_positive_int("ways", ways)
        self.shots = _check_positive_int("shots", shots)
        self.queries = _check_positive_int("queries", queries)
        self.shuffle = bool(shuffle)
        if pool.num_classes < ways:
            raise ValueError(
                f"{ways}-way tasks need at least {ways} classes, but this split has only "
                f"{pool.num_classes}"
            )
        need = shots + queries
        min_count = int(pool.counts.min())
        if min_count < need:
            worst = int(pool.counts.argmin())
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {need} drawings per class are needed, "
                f"but class {pool.names[worst]!r} has only {min_count} "
                f"(drawings are sampled without replacement)"
            )
        self.device = torch.device(device)
        self.pool = pool.to(self.device)
        # every rotation of every drawing, rotation-major: row r * (C * D) + c * D + d; a pool without rotations is
        # read in place (a view: a memory-mapped pool stays mapped, not copied)
        if self.pool.rotations == (0,):
            self._flat_images = rearrange(self.pool.images, "c d ... -> (c d) ...").contiguous()
        else:
            self._flat_images = torch.cat([
                rearrange(torch.rot90(self.pool.images, r // 90, dims=(-2, -1)), "c d ... -> (c d) ...")
                for r in self.pool.rotations
            ]).contiguous()
        # uint8 -> [0, 1] as the CPU divides, on every device: CUDA divides by a scalar as a multiplication by its
        # reciprocal, which can differ in the last bit, so other devices look the CPU's quotients up in a table
        # (on the CPU, the division itself is 7x faster than the lookup)
        self._pixel_value = (
            None if self.device.type == "cpu" else (torch.arange(256, dtype=torch.float32) / 255.0).to(self.device)
        )
        self._image_shape = self.pool.image_shape
        self._uniform = bool((pool.counts == pool.max_drawings).all())
        self._classes, self._drawings = pool.num_classes, pool.max_drawings  # (read in every sample)
        self._counts_by_device: dict[torch.device, torch.Tensor] = {}
        self.task_pool = None if task_pool is None else _check_positive_int("task_pool", task_pool)
        if task_pool_order not in TASK_POOL_ORDERS:
            raise ValueError(f"task_pool_order must be one of {TASK_POOL_ORDERS}, got {task_pool_order!r}")
        if task_pool_order != "random" and self.task_pool is None:
            raise ValueError(f"task_pool_order={task_pool_order!r} reads a task pool, but task_pool is None")
        self.task_pool_order = task_pool_order
        if self.task_pool is not None:
            small = max(self._classes, self._drawings) < 2**15
            dtype = torch.int16 if small else torch.int32  # 200,000 20-way 5-shot tasks: 88 MB, not 352 in int64
            g = torch.Generator().manual_seed(int(task_pool_seed))
            chunks = [self._fresh_indices(min(_POOL_CHUNK, self.task_pool - start), g)
                      for start in range(0, self.task_pool, _POOL_CHUNK)]
            self.pool_classes = torch.cat([c.classes.to(dtype) for c in chunks])
            self.pool_drawings = torch.cat([c.drawings.to(dtype) for c in chunks])

    def __repr__(self) -> str:
        pooled = "" if self.task_pool is None else f", a pool of {self.task_pool} tasks read {self.task_pool_order}"
        return (
            f"TaskSampler({self.ways}-way {self.shots}-shot {self.queries}-query, "
            f"{self.pool.num_classes} classes{pooled}, device={self.device})"
        )

    def _counts_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._counts_by_device:
            self._counts_by_device[device] = self.pool.counts.to(device)
        return self._counts_by_device[device]

    def sample_indices(self, num_tasks: int, generator: torch.Generator, first_task: int = 0) -> TaskIndices:
        """Draw the indices of ``num_tasks`` tasks from ``generator``: fresh, or from the task pool (picked at random,
        or read in order from index ``first_task``, the number of tasks drawn before; only an in-order pool reads
        ``first_task``)."""
        num_tasks = _check_positive_int("num_tasks", num_tasks)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if isinstance(first_task, bool) or not isinstance(first_task, int) or first_task < 0:
            raise ValueError(f"first_task must be a non-negative integer, got {first_task!r}")
        if self.task_pool is None:
            return self._fresh_indices(num_tasks, generator)
        if self.task_pool_order == "in_order":
            which = (torch.arange(num_tasks, device=generator.device) + first_task % self.task_pool) % self.task_pool
        else:
            which = torch.randint(self.task_pool, (num_tasks,), generator=generator, device=generator.device)
        which = which.to(self.pool_classes.device)
        classes, drawings = (t[which].long().to(generator.device) for t in (self.pool_classes, self.pool_drawings))
        return self._with_orders_and_rotations(classes, drawings, generator)

    def _fresh_indices(self, num_tasks: int, g: torch.Generator) -> TaskIndices:
        dev = g.device
        n, k, q = self.ways, self.shots, self.queries
        c, m = self._classes, self._drawings
        # The N smallest of C uniforms, in increasing order: a uniformly random ordered
        # choice of N distinct classes, so label n -> class is a random assignment.
        classes = torch.rand(num_tasks, c, generator=g, device=dev).topk(
            n, dim=1, largest=False
        ).indices
        keys = torch.rand(num_tasks, n, m, generator=g, device=dev)
        if not self._uniform:  # padding slots must never be picked
            counts = self._counts_on(dev)[classes]
            pad = torch.arange(m, device=dev) >= counts.unsqueeze(-1)
            keys = keys.masked_fill(pad, 2.0)
        drawings = keys.topk(k + q, dim=2, largest=False).indices
        return self._with_orders_and_rotations(classes, drawings, g)

    def _with_orders_and_rotations(
        self, classes: torch.Tensor, drawings: torch.Tensor, g: torch.Generator
    ) -> TaskIndices:
        """The tasks of ``classes`` and ``drawings`` with example orders and rotations drawn from ``g``."""
        num_tasks, dev = classes.shape[0], g.device
        n, k, q = self.ways, self.shots, self.queries
        if self.shuffle:
            s_order = torch.rand(num_tasks, n * k, generator=g, device=dev).argsort(dim=1)
            q_order = torch.rand(num_tasks, n * q, generator=g, device=dev).argsort(dim=1)
        else:
            s_order = torch.arange(n * k, device=dev).expand(num_tasks, -1)
            q_order = torch.arange(n * q, device=dev).expand(num_tasks, -1)
        if len(self.pool.rotations) > 1:  # drawn last, so pools without rotations keep their task streams
            rot = torch.randint(len(self.pool.rotations), (num_tasks, n), generator=g, device=dev)
        else:
            rot = torch.zeros(num_tasks, n, dtype=torch.long, device=dev)
        out = TaskIndices(classes, drawings, s_order, q_order, rot)
        return TaskIndices(*(t.to(self.device) for t in out))

    def batch_from_indices(self, idx: TaskIndices) -> TaskBatch:
        """Gather the images and labels named by ``idx`` (pure tensor indexing)."""
        k = self.shots
        t = idx.classes.shape[0]
        # row of each drawing in the flattened [rotations * classes * max_drawings, H, W] image tensor
        per_rotation = self._classes * self._drawings
        rows = (idx.rotations * per_rotation + idx.classes * self._drawings).unsqueeze(-1) + idx.drawings

        def part(r: torch.Tensor, per_class: int, order: torch.Tensor):
            # before shuffling, position p of the "(n k)" layout holds label p // per_class
            r = rearrange(r, "t n k -> t (n k)").gather(1, order)
            x = self._flat_images.index_select(0, r.reshape(-1))
            x = x.view(t, -1, *self._image_shape)
            x = x.float().div_(255.0) if self._pixel_value is None else self._pixel_value[x.long()]
            return x, torch.div(order, per_class, rounding_mode="floor")

        sx, sy = part(rows[:, :, :k], k, idx.support_order)
        qx, qy = part(rows[:, :, k:], self.queries, idx.query_order)
        return TaskBatch(sx, sy, qx, qy)

    def sample(self, num_tasks: int, generator: torch.Generator, first_task: int = 0) -> TaskBatch:
        """Sample ``num_tasks`` tasks as one ``TaskBatch`` on the sampler's device (``first_task``: the number of
        tasks drawn before this batch, where an in-order task pool reads from; see ``sample_indices``)."""
        return self.batch_from_indices(self.sample_indices(num_tasks, generator, first_task))


def evaluation_tasks(
    sampler: TaskSampler, num_tasks: int, seed: int, batch_size: int
) -> Iterator[TaskBatch]:
    """Yield a fixed evaluation set of ``num_tasks`` tasks in batches of ``batch_size``.

    The tasks are a function of ``(sampler's pool and N/K/Q, seed, num_tasks)`` only: a
    fresh CPU generator seeded with ``seed`` is used, so training history (or the device)
    does not change them, and neither does ``batch_size`` (indices are drawn in fixed
    internal chunks, then re-batched).
    """
    num_tasks = _check_positive_int("num_tasks", num_tasks)
    batch_size = _check_positive_int("batch_size", batch_size)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    chunks = [
        sampler.sample_indices(min(_EVAL_CHUNK, num_tasks - s), g)
        for s in range(0, num_tasks, _EVAL_CHUNK)
    ]
    idx = TaskIndices(*(torch.cat(parts) for parts in zip(*chunks, strict=True)))
    for start in range(0, num_tasks, batch_size):
        yield sampler.batch_from_indices(idx.slice(start, min(start + batch_size, num_tasks)))
