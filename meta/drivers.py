"""Drivers: run the per-task function over a batch of tasks.

Every driver takes ``task_fn(params, rule_params, buffers, task) -> (loss, (accuracy, adapted))`` and a
:class:`meta.types.Task` batch (tensors shaped ``[tasks, n*k, ...]``), and
returns the same :class:`TaskBatchResult`. The meta-gradient is that of the
mean query loss over tasks.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch.func import grad_and_value

from meta.adaptation import autograd_inner_gradients
from meta.models.functional import autograd_grads, detached
from meta.models.networks import conv_impl
from meta.types import Params, Task

TaskFn = Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, Params]]]


class TaskBatchResult(NamedTuple):
    """Per-task losses and accuracies, meta-gradients of the mean loss, and adapted parameters."""

    loss: torch.Tensor  # [tasks]
    accuracy: torch.Tensor  # [tasks]
    grads: Params  # d mean(loss) / d params
    rule_grads: Params  # d mean(loss) / d rule_params
    adapted: Params  # [tasks, ...] per-task adapted parameters


#: vmap over the task dimension of the task batch; parameters, rule parameters and buffers are shared.
TASK_IN_DIMS = (None, None, None, 0)


def _stack(trees: list[Params]) -> Params:
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


def _mean_over_tasks(tree: Params) -> Params:
    return {k: v.mean(dim=0) for k, v in tree.items()}


def vmap_driver(
    task_fn: TaskFn,
    params: Params,
    rule_params: Params,
    buffers: Params,
    tasks: Task,
    chunk_size: int | None = None,
) -> TaskBatchResult:
    """``torch.func.grad`` of the per-task function inside ``torch.vmap`` over tasks.

    ``chunk_size`` bounds memory: at most that many tasks are differentiated at once.
    """
    per_task = torch.vmap(
        grad_and_value(task_fn, argnums=(0, 1), has_aux=True),
        in_dims=TASK_IN_DIMS,
        chunk_size=chunk_size,
    )
    (g_params, g_rule), (loss, (accuracy, adapted)) = per_task(params, rule_params, buffers, tasks)
    return TaskBatchResult(loss, accuracy, _mean_over_tasks(g_params), _mean_over_tasks(g_rule), adapted)


def loop_driver(
    task_fn: TaskFn,
    params: Params,
    rule_params: Params,
    buffers: Params,
    tasks: Task,
    chunk_size: int | None = None,
) -> TaskBatchResult:
    """The reference: an explicit Python for-loop over tasks calling the same function."""
    per_task = grad_and_value(task_fn, argnums=(0, 1), has_aux=True)
    results = [per_task(params, rule_params, buffers, tasks.select(i)) for i in range(tasks.num_tasks)]
    g_params = _stack([r[0][0] for r in results])
    g_rule = _stack([r[0][1] for r in results])
    loss = torch.stack([r[1][0] for r in results])
    accuracy = torch.stack([r[1][1][0] for r in results])
    adapted = _stack([r[1][1][1] for r in results])
    return TaskBatchResult(loss, accuracy, _mean_over_tasks(g_params), _mean_over_tasks(g_rule), adapted)


def _leaves(tree: Params) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in tree.items()}


def vmap_autograd_driver(
    task_fn: TaskFn,
    params: Params,
    rule_params: Params,
    buffers: Params,
    tasks: Task,
    chunk_size: int | None = None,
) -> TaskBatchResult:
    """The functorch-example shape: ``vmap`` of the per-task function (inner ``torch.func.grad``), then one
    plain-autograd backward of the mean loss. Often the fastest; ``chunk_size`` does not bound memory here,
    because the graph of every chunk is kept for the backward."""
    leaves, rule_leaves = _leaves(params), _leaves(rule_params)
    with torch.enable_grad():
        per_task = torch.vmap(task_fn, in_dims=TASK_IN_DIMS, chunk_size=chunk_size)
        loss, (accuracy, adapted) = per_task(leaves, rule_leaves, buffers, tasks)
        g_params, g_rule = autograd_grads(loss.mean(), (leaves, rule_leaves))
    return TaskBatchResult(loss.detach(), accuracy.detach(), g_params, g_rule, detached(adapted))


def loop_autograd_driver(
    task_fn: TaskFn,
    params: Params,
    rule_params: Params,
    buffers: Params,
    tasks: Task,
    chunk_size: int | None = None,
) -> TaskBatchResult:
    """learn2learn's shape: a Python loop over tasks, plain autograd for the inner gradients and for one backward
    per task (memory of one task)."""
    leaves, rule_leaves = _leaves(params), _leaves(rule_params)
    num_tasks = tasks.num_tasks
    losses, accuracies, adapted, g_params, g_rule = [], [], [], None, None
    for i in range(num_tasks):
        with torch.enable_grad(), autograd_inner_gradients():
            loss, (accuracy, fast) = task_fn(leaves, rule_leaves, buffers, tasks.select(i))
            gp, gr = autograd_grads(loss / num_tasks, (leaves, rule_leaves))
        g_params = gp if g_params is None else {k: g_params[k] + gp[k] for k in gp}
        g_rule = gr if g_rule is None else {k: g_rule[k] + gr[k] for k in gr}
        losses.append(loss.detach())
        accuracies.append(accuracy.detach())
        adapted.append(detached(fast))
    return TaskBatchResult(torch.stack(losses), torch.stack(accuracies), g_params, g_rule, _stack(adapted))


def threaded(driver: Callable[..., TaskBatchResult], name: str) -> Callable[..., TaskBatchResult]:
    """``driver`` on ``workers`` threads (default: torch's intra-op thread count), each running its share of
    the tasks with single-threaded kernels. PyTorch kernels and autograd release the GIL, so the shares run in
    parallel; on a CPU this beats splitting each small kernel across threads. Memory: that of ``workers``
    shares at once (``chunk_size`` applies within each share)."""

    def threaded_driver(
        task_fn: TaskFn,
        params: Params,
        rule_params: Params,
        buffers: Params,
        tasks: Task,
        chunk_size: int | None = None,
        workers: int | None = None,
    ) -> TaskBatchResult:
        num_tasks = tasks.num_tasks
        workers = max(1, min(workers or torch.get_num_threads(), num_tasks))
        shares = [torch.arange(num_tasks)[w::workers] for w in range(workers)]  # task i goes to worker i % workers

        def run(share: torch.Tensor) -> TaskBatchResult:
            return driver(task_fn, params, rule_params, buffers, tasks.select(share), chunk_size)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # new threads take this count; restored below
        try:
            with ThreadPoolExecutor(workers) as pool:  # each call copies the caller's context (the conv impl)
                parts = list(pool.map(lambda share: contextvars.copy_context().run(run, share), shares))
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

    threaded_driver.__name__ = threaded_driver.__qualname__ = name
    threaded_driver.__doc__ = f"``{driver.__name__}`` on several threads (see :func:`threaded`)."
    return threaded_driver


threaded_loop_driver = threaded(loop_autograd_driver, "threaded_loop_driver")


# ---- drivers for outer strategies without a meta-backward pass (Reptile, iMAML) ---------------------------------
# Their per-task function returns ``(loss, accuracy, grads, adapted)`` where ``grads`` is the task's own
# contribution to the outer direction (Reptile: initial - adapted; iMAML: the implicit meta-gradient); the drivers
# map it over the tasks and average ``grads``. They take and return the same shapes as the drivers above.


def map_vmap_driver(
    task_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, Params, Params]],
    params: Params,
    rule_params: Params,
    buffers: Params,
    tasks: Task,
    chunk_size: int | None = None,
) -> TaskBatchResult:
    """``torch.vmap`` of the per-task function over tasks, then the mean of its per-task directions."""
    loss, accuracy, grads, adapted = torch.vmap(task_fn, in_dims=TASK_IN_DIMS, chunk_size=chunk_size)(
        params, rule_params, buffers, tasks
    )
    return TaskBatchResult(loss, accuracy, _mean_over_tasks(grads), {}, adapted)


def map_loop_driver(
    task_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, Params, Params]],
    params: Params,
    rule_params: Params,
    buffers: Params,
    tasks: Task,
    chunk_size: int | None = None,
) -> TaskBatchResult:
    """The reference: a Python for-loop over tasks calling the same per-task function."""
    rows = [task_fn(params, rule_params, buffers, tasks.select(i)) for i in range(tasks.num_tasks)]
    loss, accuracy = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    grads, adapted = _stack([r[2] for r in rows]), _stack([r[3] for r in rows])
    return TaskBatchResult(loss, accuracy, _mean_over_tasks(grads), {}, adapted)


def vmap_forward(
    task_fn: TaskFn,
    params: Params,
    rule_params: Params,
    buffers: Params,
    tasks: Task,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query loss and accuracy without a meta-gradient (evaluation)."""
    per_task = torch.vmap(task_fn, in_dims=TASK_IN_DIMS, chunk_size=chunk_size)
    loss, (accuracy, _) = per_task(params, rule_params, buffers, tasks)
    return loss, accuracy


#: What the ``auto`` driver chooses from, per device type: "driver+convolution implementation".
AUTO_CANDIDATES: dict[str, tuple[str, ...]] = {
    "cpu": ("vmap+native", "vmap_autograd+native", "loop_autograd+native", "loop_threads+native"),
    "cuda": ("vmap+native", "vmap_autograd+native", "loop_autograd+native"),
}


class AutoDriver:
    """Picks the fastest exact strategy per setting by timing each candidate on the first batch.

    ``drivers`` and ``candidates`` default to the meta-gradient drivers (:data:`DRIVERS`, :data:`AUTO_CANDIDATES`);
    learners whose outer strategy has its own driver table (:data:`MAP_DRIVERS`) pass theirs.

    Candidates (:data:`AUTO_CANDIDATES`) are the vmap driver, the functorch-example shape (vmap forward,
    autograd backward), the learn2learn shape (loop, autograd backward per task) and, on a CPU, that loop on
    several threads; they compute the same numbers up to rounding, so the choice changes speed only.
    Each candidate runs once to warm up, then ``timed_rounds`` times, interleaved; the fastest single time
    wins. Candidates whose warm-up took over ``prune_factor`` times the fastest warm-up are not timed again.
    The choice is cached per setting (task shapes, dtype, device, chunk size, inner steps, rule, inner
    mini-batch), like ``cudnn.benchmark``; ``choices`` records it so runs can log what ran.
    """

    def __init__(
        self,
        timed_rounds: int = 2,
        prune_factor: float = 3.0,
        drivers: dict[str, Callable[..., TaskBatchResult]] | None = None,
        candidates: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.timed_rounds = timed_rounds
        self.prune_factor = prune_factor
        self.drivers = DRIVERS if drivers is None else drivers
        self.candidates = AUTO_CANDIDATES if candidates is None else candidates
        self.choices: dict[tuple, str] = {}

    @staticmethod
    def _signature(task_fn: TaskFn, tasks: Task, chunk_size: int | None) -> tuple:
        keywords = getattr(task_fn, "keywords", {})
        rule = keywords.get("rule")
        return (tuple(tuple(t.shape) for t in tasks), tasks[0].dtype, tasks[0].device.type, chunk_size,
                keywords.get("steps"), getattr(rule, "name", None), keywords.get("batch_size"))

    def _run(self, candidate: str, *args) -> TaskBatchResult:
        driver, impl = candidate.split("+")
        with conv_impl(impl):
            return self.drivers[driver](*args)

    def __call__(
        self,
        task_fn: TaskFn,
        params: Params,
        rule_params: Params,
        buffers: Params,
        tasks: Task,
        chunk_size: int | None = None,
    ) -> TaskBatchResult:
        args = (task_fn, params, rule_params, buffers, tasks, chunk_size)
        key = self._signature(task_fn, tasks, chunk_size)
        if key in self.choices:
            return self._run(self.choices[key], *args)
        device = tasks[0].device
        candidates = self.candidates.get(device.type, self.candidates["cuda"])
        if chunk_size is not None:  # bounded memory was asked for: vmap_autograd keeps every chunk's graph
            candidates = tuple(c for c in candidates if not c.startswith("vmap_autograd"))
        warmup: dict[str, float] = {}
        timings: dict[str, float] = {}
        results = {}
        for round_ in range(1 + self.timed_rounds):  # a warm-up round, then interleaved timed rounds
            for candidate in candidates:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                results[candidate] = self._run(candidate, *args)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start
                if round_ == 0:
                    warmup[candidate] = elapsed
                else:
                    timings[candidate] = min(timings.get(candidate, elapsed), elapsed)
            if round_ == 0:  # candidates far behind already are not timed again (saves minutes on big settings)
                fastest = min(warmup.values())
                candidates = tuple(c for c in candidates if warmup[c] <= self.prune_factor * fastest)
        self.choices[key] = min(timings, key=timings.get)
        return results[self.choices[key]]


#: The stateless drivers; ``auto`` is an :class:`AutoDriver` that each learner owns (it caches its choices).
DRIVERS: dict[str, Callable[..., TaskBatchResult]] = {
    "vmap": vmap_driver,
    "loop": loop_driver,
    "vmap_autograd": vmap_autograd_driver,
    "loop_autograd": loop_autograd_driver,
    "loop_threads": threaded_loop_driver,
}
#: Drivers that may run the per-task function under ``torch.vmap``.
VECTORIZED_DRIVERS = ("vmap", "vmap_autograd", "auto")

#: Drivers of the outer strategies without a meta-backward pass (Reptile, iMAML): there is no backward for the
#: ``*_autograd`` drivers to differ in, so these are all they have.
MAP_DRIVERS: dict[str, Callable[..., TaskBatchResult]] = {
    "vmap": map_vmap_driver,
    "loop": map_loop_driver,
    "loop_threads": threaded(map_loop_driver, "threaded_map_loop_driver"),
}
MAP_AUTO_CANDIDATES: dict[str, tuple[str, ...]] = {
    "cpu": ("vmap+native", "loop+native", "loop_threads+native"),
    "cuda": ("vmap+native", "loop+native"),
}
#: The same without threads, for per-task functions that use forward-mode AD (``torch.func.jvp``, iMAML's
#: Hessian-vector products): its dual level is process-global, so two threads running it at once break it.
UNTHREADED_MAP_DRIVERS = {k: v for k, v in MAP_DRIVERS.items() if k != "loop_threads"}
UNTHREADED_MAP_AUTO_CANDIDATES = {"cpu": ("vmap+native", "loop+native"), "cuda": ("vmap+native", "loop+native")}
