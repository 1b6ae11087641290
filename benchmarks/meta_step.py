"""One full meta-step (inner loop, meta-gradient, Adam step) for each implementation, on the same weights and data."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import meta
from meta.models import set_conv_impl
from meta.training.cuda_graph import GraphedMetaStep

Tasks = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Setting:
    """A benchmark setting: task shape, task count, inner steps and order."""

    ways: int
    shots: int
    queries: int
    tasks: int
    steps: int
    first_order: bool

    @property
    def lr(self) -> float:
        return 0.4 if self.ways == 5 else 0.1  # MAML's 5-way / 20-way inner learning rates

    @property
    def name(self) -> str:
        order = "1st" if self.first_order else "2nd"
        return f"{self.ways}w{self.shots}s q{self.queries} T{self.tasks} {self.steps}step {order}"


def paper_grid() -> list[Setting]:
    """5w1s/5w5s with 32 tasks, 20w1s/20w5s with 16; second and first order; 1 and 5 steps; K and 15 queries."""
    grid = []
    for ways, shots, tasks in ((5, 1, 32), (5, 5, 32), (20, 1, 16), (20, 5, 16)):
        for first_order in (False, True):
            for steps in (1, 5):
                for queries in sorted({shots, 15}):
                    grid.append(Setting(ways, shots, queries, tasks, steps, first_order))
    return grid


def random_tasks(s: Setting, device: torch.device, generator: torch.Generator, size: int = 28) -> Tasks:
    """Random images with balanced labels, shaped like a batch of Omniglot tasks."""
    sy = torch.arange(s.ways).repeat_interleave(s.shots).expand(s.tasks, -1).contiguous()
    qy = torch.arange(s.ways).repeat_interleave(s.queries).expand(s.tasks, -1).contiguous()
    sx = torch.rand(s.tasks, s.ways * s.shots, 1, size, size, generator=generator)
    qx = torch.rand(s.tasks, s.ways * s.queries, 1, size, size, generator=generator)
    return sx.to(device), sy.to(device), qx.to(device), qy.to(device)


def _inner_rule(s: Setting) -> meta.InnerRule:
    rule = meta.sgd(lr=s.lr)
    return meta.first_order(rule) if s.first_order else rule


def ours(model: nn.Module, s: Setting, tasks: Tasks, driver: str, conv_impl: str = "native",
         chunk_size: int | None = None) -> Callable[[], None]:
    """This library's MetaLearner with a given driver and convolution implementation."""
    model = set_conv_impl(copy.deepcopy(model), conv_impl)
    learner = meta.MetaLearner(model, _inner_rule(s), inner_steps=s.steps)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step() -> None:
        learner.train_step(optimizer, tasks, driver=driver, chunk_size=chunk_size)

    step.learner = learner  # lets the benchmark report what the auto driver chose
    return step


def ours_cuda_graph(model: nn.Module, s: Setting, tasks: Tasks, driver: str = "vmap") -> Callable[[], None]:
    """``ours`` with the whole meta-step (inner loop, meta-gradient, Adam) replayed as a CUDA graph
    (:class:`meta.training.cuda_graph.GraphedMetaStep`, what ``train.cuda_graph=true`` runs). The graph is
    captured here, after the warm-up steps; ``step(new_tasks)`` copies other tasks into its input buffers."""
    learner = meta.MetaLearner(copy.deepcopy(model), _inner_rule(s),
                               inner_steps=s.steps)
    lr = torch.tensor(1e-3, device=tasks[0].device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=lr, capturable=True)
    graphed = GraphedMetaStep(learner, optimizer, driver=driver)
    for _ in range(graphed.warmup_steps + 1):  # eager warm-up steps, then the capture
        graphed(tasks)

    def step(new_tasks: Tasks | None = None) -> None:
        graphed(tasks if new_tasks is None else new_tasks)

    step.learner = learner
    return step


def functorch_example(model: nn.Module, s: Setting, tasks: Tasks) -> Callable[[], None]:
    """The plain functorch MAML example: vmap of the per-task loss over tasks, then ``.backward()``."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_for_task(sx, sy, qx, qy):
        def compute_loss(p, x, y):
            return F.cross_entropy(functional_call(model, p, (x,)), y)

        new = params
        for _ in range(s.steps):
            grads = grad(compute_loss)(new, sx, sy)
            if s.first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            new = {k: new[k] - s.lr * grads[k] for k in new}
        return compute_loss(new, qx, qy)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        vmap(loss_for_task)(*tasks).mean().backward()
        optimizer.step()

    return step


def learn2learn_maml(model: nn.Module, s: Setting, tasks: Tasks) -> Callable[[], None]:
    """learn2learn's MAML: clone and adapt each task in a Python loop, then ``.backward()``."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(copy.deepcopy(model), lr=s.lr, first_order=s.first_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for sx, sy, qx, qy in zip(*tasks):
            clone = maml.clone()
            for _ in range(s.steps):
                clone.adapt(F.cross_entropy(clone(sx), sy))
            (F.cross_entropy(clone(qx), qy) / s.tasks).backward()
        optimizer.step()

    return step


#: every implementation :func:`candidates` can return, by name (``vmap+cudagraph`` on CUDA only)
CANDIDATE_NAMES = ("auto", "vmap", "loop", "vmap_autograd", "loop_autograd", "loop_threads", "functorch",
                   "vmap+cudagraph", "learn2learn")


def candidates(model: nn.Module, s: Setting, tasks: Tasks, with_l2l: bool = True) -> dict[str, Callable[[], None]]:
    """Every implementation to compare, by name."""
    out = {
        "auto": ours(model, s, tasks, "auto"),
        "vmap": ours(model, s, tasks, "vmap"),
        "loop": ours(model, s, tasks, "loop"),
        "vmap_autograd": ours(model, s, tasks, "vmap_autograd"),
        "loop_autograd": ours(model, s, tasks, "loop_autograd"),
        "loop_threads": ours(model, s, tasks, "loop_threads"),
        "functorch": functorch_example(model, s, tasks),
    }
    if tasks[0].is_cuda:
        try:
            out["vmap+cudagraph"] = ours_cuda_graph(model, s, tasks)
        except RuntimeError as error:  # reported, not fatal: the other columns still mean something
            print(f"{s.name}: CUDA graph capture failed: {str(error).splitlines()[0]}")
    if with_l2l:
        out["learn2learn"] = learn2learn_maml(model, s, tasks)
    return out
