"""Drivers: run a per-task function over a batch of tasks, and the one "outer gradient x driver" table.

A driver takes one :class:`Problem` (the per-task function, the shared parameter trees, the task batch and an
optional ``chunk_size``) and returns a :class:`TaskBatchResult`. What it maps depends on how the outer strategy
gets its per-task direction (:data:`OUTER_KINDS`):

* ``backprop``: ``task_fn(params, rule_params, buffers, task, autograd_inner=False) -> (loss, (accuracy,
  adapted))`` is differentiated (MAML in second or first order, MAML++, ProtoNets); the direction is the gradient
  of the mean query loss, by ``torch.func.grad`` (``vmap``, ``loop``) or plain autograd (``*_autograd``).
* ``direction``: ``task_fn(params, rule_params, buffers, task) -> Direction`` returns its own per-task direction
  (Reptile's difference, iMAML's implicit gradient); the drivers only map it and average.

:data:`DRIVERS` maps ``(kind, driver name)`` to the driver; ``auto`` (:class:`AutoDriver`, at the end of the
module) times the candidates of a kind on the first batch and keeps the fastest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch.func import grad_and_value

from meta.models.networks import autograd_grads, detached
from meta.types import Params, Task

#: ``backprop``: the driver differentiates the per-task loss; ``direction``: the per-task function returns its
#: own direction (see the module docstring)
OUTER_KINDS = ("backprop", "direction")


class TaskBatchResult(NamedTuple):
    """Per-task losses and accuracies, meta-gradients of the mean loss, and adapted parameters."""

    loss: torch.Tensor  # [tasks]
    accuracy: torch.Tensor  # [tasks]
    grads: Params  # d mean(loss) / d params (or the mean per-task direction)
    rule_grads: Params  # d mean(loss) / d rule_params
    adapted: Params  # [tasks, ...] per-task adapted parameters


class Direction(NamedTuple):
    """One task's outcome and its share of the outer direction (stacked over tasks by the drivers)."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    grads: Params
    rule_grads: Params
    adapted: Params


TaskFn = Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, Params]] | Direction]


class Problem(NamedTuple):
    """What every driver runs: ``task_fn`` over the tasks of ``tasks`` with shared ``params``, ``rule_params``
    and ``buffers``; ``chunk_size`` bounds how many tasks are vmapped at once (None: all)."""

    task_fn: TaskFn
    params: Params
    rule_params: Params
    buffers: Params
    tasks: Task
    chunk_size: int | None = None


Driver = Callable[[Problem], TaskBatchResult]

#: vmap over the task dimension of the task batch; parameters, rule parameters and buffers are shared.
TASK_IN_DIMS = (None, None, None, 0)


def select_tasks(tasks: Task, index: int | torch.Tensor) -> Task:
    """Task ``index`` of a batch (an int), or the sub-batch of the tasks at ``index`` (an index tensor)."""
    return Task(*(t[index] for t in tasks))


def _stack(trees: list[Params]) -> Params:
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


def _mean_over_tasks(tree: Params) -> Params:
    return {k: v.mean(dim=0) for k, v in tree.items()}


def _averaged(per_task: Direction) -> TaskBatchResult:
    """The batch result of per-task directions stacked over tasks: their mean."""
    return TaskBatchResult(per_task.loss, per_task.accuracy, _mean_over_tasks(per_task.grads),
                           _mean_over_tasks(per_task.rule_grads), per_task.adapted)


def map_vmap(problem: Problem) -> TaskBatchResult:
    """``torch.vmap`` of a direction-returning per-task function over tasks, then the mean direction."""
    task_fn, params, rule_params, buffers, tasks, chunk_size = problem
    return _averaged(torch.vmap(task_fn, in_dims=TASK_IN_DIMS, chunk_size=chunk_size)(params, rule_params, buffers,
                                                                                        tasks))


def map_loop(problem: Problem) -> TaskBatchResult:
    """The reference: a Python for-loop over tasks calling the same per-task function."""
    task_fn, params, rule_params, buffers, tasks, _ = problem
    rows = [task_fn(params, rule_params, buffers, select_tasks(tasks, i)) for i in range(len(tasks.support_x))]
    return _averaged(Direction(
        torch.stack([r.loss for r in rows]), torch.stack([r.accuracy for r in rows]), _stack([r.grads for r in rows]),
        _stack([r.rule_grads for r in rows]), _stack([r.adapted for r in rows]),
    ))


def with_func_grad(task_fn: TaskFn) -> Callable[..., Direction]:
    """A loss-returning per-task function turned into a direction-returning one: its ``torch.func`` gradient
    in the parameters and the rule parameters."""

    def direction(params: Params, rule_params: Params, buffers: Params, task: Task) -> Direction:
        (g_params, g_rule), (loss, (accuracy, adapted)) = grad_and_value(task_fn, argnums=(0, 1), has_aux=True)(
            params, rule_params, buffers, task)
        return Direction(loss, accuracy, g_params, g_rule, adapted)

    return direction


def vmap_driver(problem: Problem) -> TaskBatchResult:
    """``torch.func.grad`` of the per-task loss inside ``torch.vmap`` over tasks. ``chunk_size`` bounds memory:
    at most that many tasks are differentiated at once."""
    return map_vmap(problem._replace(task_fn=with_func_grad(problem.task_fn)))


def loop_driver(problem: Problem) -> TaskBatchResult:
    """The reference: an explicit Python for-loop over tasks, ``torch.func.grad`` of each task's loss."""
    return map_loop(problem._replace(task_fn=with_func_grad(problem.task_fn)))


def _leaves(tree: Params) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in tree.items()}


def vmap_autograd_driver(problem: Problem) -> TaskBatchResult:
    """The functorch-example shape: ``vmap`` of the per-task function (inner ``torch.func.grad``), then one
    plain-autograd backward of the mean loss. Often the fastest; ``chunk_size`` does not bound memory here,
    because the graph of every chunk is kept for the backward."""
    task_fn, params, rule_params, buffers, tasks, chunk_size = problem
    leaves, rule_leaves = _leaves(params), _leaves(rule_params)
    with torch.enable_grad():
        per_task = torch.vmap(task_fn, in_dims=TASK_IN_DIMS, chunk_size=chunk_size)
        loss, (accuracy, adapted) = per_task(leaves, rule_leaves, buffers, tasks)
        g_params, g_rule = autograd_grads(loss.mean(), (leaves, rule_leaves))
    return TaskBatchResult(loss.detach(), accuracy.detach(), g_params, g_rule, detached(adapted))


def loop_autograd_driver(problem: Problem) -> TaskBatchResult:
    """learn2learn's shape: a Python loop over tasks, plain autograd for the inner gradients
    (``autograd_inner=True``) and for one backward per task (memory of one task)."""
    task_fn, params, rule_params, buffers, tasks, _ = problem
    leaves, rule_leaves = _leaves(params), _leaves(rule_params)
    num_tasks = len(tasks.support_x)
    losses, accuracies, adapted, g_params, g_rule = [], [], [], None, None
    for i in range(num_tasks):
        with torch.enable_grad():
            loss, (accuracy, fast) = task_fn(leaves, rule_leaves, buffers, select_tasks(tasks, i), autograd_inner=True)
            gp, gr = autograd_grads(loss / num_tasks, (leaves, rule_leaves))
        g_params = gp if g_params is None else {k: g_params[k] + gp[k] for k in gp}
        g_rule = gr if g_rule is None else {k: g_rule[k] + gr[k] for k in gr}
        losses.append(loss.detach())
        accuracies.append(accuracy.detach())
        adapted.append(detached(fast))
    return TaskBatchResult(torch.stack(losses), torch.stack(accuracies), g_params, g_rule, _stack(adapted))


def threaded(driver: Driver) -> Driver:
    """``driver`` on torch's intra-op thread count of threads, each running its share of the tasks with
    single-threaded kernels. PyTorch kernels and autograd release the GIL, so the shares run in parallel; on a
    CPU this beats splitting each small kernel across threads. Memory: that of one share per thread at once."""

    def threaded_driver(problem: Problem) -> TaskBatchResult:
        num_tasks = len(problem.tasks.support_x)
        workers = max(1, min(torch.get_num_threads(), num_tasks))
        shares = [torch.arange(num_tasks)[w::workers] for w in range(workers)]  # task i goes to worker i % workers
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # new threads take this count; restored below
        try:
            # Each thread calls the model through its own copy: functional_call swaps tensors into the module while
            # it runs, so two threads on one module would see each other's weights. meta.models.functional_forward
            # makes that thread-local copy; it is the one piece of hidden per-thread state, and it must exist.
            with ThreadPoolExecutor(workers) as pool:
                parts = list(pool.map(lambda share: driver(problem._replace(tasks=select_tasks(problem.tasks, share))),
                                      shares))
        finally:
            torch.set_num_threads(threads)
        order = torch.cat(shares).argsort()  # back to task order

        def weighted_sum(trees: list[Params]) -> Params:  # each part holds the mean over its own share
            return {k: sum(len(sh) / num_tasks * tree[k] for sh, tree in zip(shares, trees)) for k in trees[0]}

        return TaskBatchResult(
            torch.cat([p.loss for p in parts])[order],
            torch.cat([p.accuracy for p in parts])[order],
            weighted_sum([p.grads for p in parts]),
            weighted_sum([p.rule_grads for p in parts]),
            {k: torch.cat([p.adapted[k] for p in parts])[order] for k in parts[0].adapted},
        )

    threaded_driver.__doc__ = f"``{driver.__name__}`` on several threads (see :func:`threaded`)."
    return threaded_driver


def vmap_forward(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query loss and accuracy of a loss-returning per-task function, without a meta-gradient."""
    task_fn, params, rule_params, buffers, tasks, chunk_size = problem
    loss, (accuracy, _) = torch.vmap(task_fn, in_dims=TASK_IN_DIMS, chunk_size=chunk_size)(params, rule_params,
                                                                                           buffers, tasks)
    return loss, accuracy


#: The one table: ``(outer kind, driver name) -> driver``. ``auto`` (:class:`AutoDriver`) is not
#: in it: each learner owns one, which times the entries of its kind and caches its choice.
DRIVERS: dict[tuple[str, str], Driver] = {
    ("backprop", "vmap"): vmap_driver,
    ("backprop", "loop"): loop_driver,
    ("backprop", "vmap_autograd"): vmap_autograd_driver,
    ("backprop", "loop_autograd"): loop_autograd_driver,
    ("backprop", "loop_threads"): threaded(loop_autograd_driver),
    # no meta-backward pass: nothing for the *_autograd drivers to differ in
    ("direction", "vmap"): map_vmap,
    ("direction", "loop"): map_loop,
    ("direction", "loop_threads"): threaded(map_loop),
}
#: Drivers that may run the per-task function under ``torch.vmap`` (for the fused-norm check).
VECTORIZED_DRIVERS = ("vmap", "vmap_autograd", "auto")


def drivers_of(kind: str, refused: tuple[str, ...] = ()) -> dict[str, Driver]:
    """The drivers of an outer ``kind`` (:data:`OUTER_KINDS`), by name, less the ``refused`` ones."""
    if kind not in OUTER_KINDS:
        raise ValueError(f"unknown outer kind {kind!r}; choose one of {OUTER_KINDS}")
    return {name: fn for (k, name), fn in DRIVERS.items() if k == kind and name not in refused}


# ---- auto: the fastest exact driver for a setting, timed on its first batch and then kept ----------

#: What ``auto`` chooses from, per outer kind and device type (names in :data:`meta.drivers.DRIVERS`): the vmap
#: driver, the functorch-example shape (vmap forward, autograd backward), the learn2learn shape (loop, autograd
#: backward per task) and, on a CPU, that loop on several threads. They compute the same numbers up to rounding.
AUTO_CANDIDATES: dict[str, dict[str, tuple[str, ...]]] = {
    "backprop": {"cpu": ("vmap", "vmap_autograd", "loop_autograd", "loop_threads"),
                 "cuda": ("vmap", "vmap_autograd", "loop_autograd")},
    "direction": {"cpu": ("vmap", "loop", "loop_threads"), "cuda": ("vmap", "loop")},
}
#: Candidates whose memory ``chunk_size`` does not bound (every chunk's graph is kept for one backward).
UNBOUNDED_MEMORY = ("vmap_autograd",)


def setting_key(problem: Problem, strategy: str) -> tuple:
    """What a choice is cached under: the task shapes, dtype, device type, ``chunk_size`` (index 3) and the
    learner's own description of the work (``strategy``: outer strategy, rule, steps, inner mini-batch...).
    A plain tuple of strings, ints and dtypes, so checkpoints hold it as data."""
    tasks = problem.tasks
    return (tuple(tuple(t.shape) for t in tasks), tasks.support_x.dtype, tasks.support_x.device.type,
            problem.chunk_size, strategy)


class AutoDriver:
    """Picks the fastest exact driver per setting by timing each candidate on the first batch.

    Each candidate runs once to warm up, then ``timed_rounds`` times, interleaved; the fastest single time wins.
    Candidates whose warm-up took over ``prune_factor`` times the fastest warm-up are not timed again. The choice
    is cached per :func:`setting_key`, like ``cudnn.benchmark``; ``choices`` records it (setting -> driver name)
    so that runs can log what ran and checkpoints keep it.
    """

    def __init__(
        self, timed_rounds: int = 2, prune_factor: float = 3.0, candidates: dict[str, tuple[str, ...]] | None = None
    ) -> None:
        self.timed_rounds = timed_rounds
        self.prune_factor = prune_factor
        #: device type -> driver names to time, instead of :data:`AUTO_CANDIDATES` of the learner's outer kind
        self.candidates = candidates
        self.choices: dict[tuple, str] = {}

    def __call__(self, problem: Problem, strategy: str, drivers: dict[str, Driver]) -> TaskBatchResult:
        """Run ``problem`` on the driver chosen for this setting among ``drivers`` (the learner's, name -> driver),
        timing the candidates among them first if the setting is new. ``strategy`` is the learner's outer kind
        (:data:`AUTO_CANDIDATES`) followed by its description of the work (see :func:`setting_key`)."""
        key = setting_key(problem, strategy)
        if self.choices.get(key) in drivers:  # (a choice restored from an older checkpoint may name none)
            return drivers[self.choices[key]](problem)
        device = problem.tasks.support_x.device
        by_device = AUTO_CANDIDATES[strategy.split()[0]] if self.candidates is None else self.candidates
        names = tuple(n for n in by_device[device.type if device.type in by_device else "cuda"] if n in drivers)
        if problem.chunk_size is not None:  # bounded memory was asked for
            names = tuple(n for n in names if n not in UNBOUNDED_MEMORY)
        warmup: dict[str, float] = {}
        timings: dict[str, float] = {}
        results = {}
        for round_ in range(1 + self.timed_rounds):  # a warm-up round, then interleaved timed rounds
            for name in names:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                results[name] = drivers[name](problem)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start
                if round_ == 0:
                    warmup[name] = elapsed
                else:
                    timings[name] = min(timings.get(name, elapsed), elapsed)
            if round_ == 0:  # candidates far behind already are not timed again (saves minutes on big settings)
                fastest = min(warmup.values())
                names = tuple(n for n in names if warmup[n] <= self.prune_factor * fastest)
        self.choices[key] = min(timings, key=timings.get)
        return results[self.choices[key]]
