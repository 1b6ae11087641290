"""A training meta-step (meta-gradient, ``.grad``, optimizer step) captured as a CUDA graph and replayed.

At the paper's task sizes a GPU meta-step is launch-bound: thousands of small kernels, each waiting on Python.
Replaying a captured graph runs the same kernels on the same buffers without that overhead (10-150x
learn2learn on an H100, ``experiments/benchmarks/h100``). The graph replays *exactly* the captured work, so:

* every input that changes between steps lives in a fixed buffer: the task tensors (copied in before each
  replay), the ``.grad`` tensors, the optimizer state and its learning rate, which must be a tensor
  (``torch.optim.Adam(..., lr=torch.tensor(...), capturable=True)``; schedules ``fill_`` it);
* anything that changes the work itself (task shapes, the rule's derivative order, MAML++'s multi-step loss
  switching on or off) starts a new graph: :meth:`GraphedMetaStep._signature` keys them;
* before capturing, each new signature runs ``warmup_steps`` ordinary (eager) steps, which are real training
  steps, so a graphed run takes the same steps as an eager one.
"""

from __future__ import annotations

import gc

import torch

from meta.learner import MetaLearner, Tasks

#: drivers whose graphed steps have matched eager steps on a GPU: vmap_autograd did on an H200 (torch 2.11); with
#: plain vmap the first replayed update differed (the next loss 0.1-1.6% apart), and the loop drivers and auto
#: (which may pick vmap) have not been checked there (experiments/benchmarks/h200). ``loop_threads`` runs on CPU
#: threads and cannot be captured at all.
GRAPHABLE_DRIVERS = ("vmap_autograd",)


def check_graphable(learner: MetaLearner, optimizer: torch.optim.Optimizer, driver: str) -> None:
    """Raise ``ValueError`` unless this learner, optimizer and driver can run as a CUDA graph."""
    devices = {p.device.type for p in learner.parameters()}
    if devices != {"cuda"}:
        raise ValueError(f"CUDA graphs need the learner on a CUDA device, not {sorted(devices)}")
    if driver not in GRAPHABLE_DRIVERS:
        raise ValueError(f"driver {driver!r} cannot run inside a CUDA graph; choose one of {GRAPHABLE_DRIVERS}")
    if not isinstance(optimizer, torch.optim.Adam) or not all(g["capturable"] for g in optimizer.param_groups):
        raise ValueError("CUDA graphs need torch.optim.Adam(..., capturable=True)")
    if not all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups):
        raise ValueError("CUDA graphs need the optimizer's lr as a tensor (a float would be frozen into the graph)")


class GraphedMetaStep:
    """``step(tasks) -> (loss, accuracy)`` per task, like an eager training meta-step, replayed as a CUDA graph.

    The eager step it stands for is ``learner.train_step(optimizer, tasks, driver, chunk_size)``. The returned
    tensors are the graph's output buffers: read (or clone) them before the next call.
    """

    def __init__(
        self,
        learner: MetaLearner,
        optimizer: torch.optim.Optimizer,
        driver: str = "vmap",
        chunk_size: int | None = None,
        warmup_steps: int = 2,
    ) -> None:
        check_graphable(learner, optimizer, driver)
        self.learner, self.optimizer, self.driver, self.chunk_size = learner, optimizer, driver, chunk_size
        self.warmup_steps = warmup_steps
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tasks, torch.Tensor | None, tuple]] = {}
        self.eager_steps: dict[tuple, int] = {}
        for p in learner.parameters():  # gradients live in fixed buffers that every step overwrites
            p.grad = torch.zeros_like(p)

    def _signature(self, tasks: Tasks) -> tuple:
        rule, weights = self.learner.active_rule(), self.learner.phase.step_weights
        return (tuple((tuple(t.shape), t.dtype) for t in tasks), getattr(rule, "name", None),
                getattr(rule, "first_order", False),
                None if weights is None else tuple(weights.shape))

    def _body(self, tasks: Tasks, step_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        saved = self.learner.phase  # the graph reads the multi-step weights from its own fixed buffer
        self.learner.phase = saved._replace(step_weights=step_weights)
        try:  # write_grads copies into the fixed .grad buffers
            result = self.learner.train_step(self.optimizer, tasks, driver=self.driver, chunk_size=self.chunk_size)
        finally:
            self.learner.phase = saved
        return result.loss, result.accuracy

    def __call__(self, tasks: Tasks) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._signature(tasks)
        if key in self.graphs:
            graph, static_tasks, static_weights, outputs = self.graphs[key]
            for buffer, t in zip(static_tasks, tasks):
                buffer.copy_(t)
            if static_weights is not None:
                static_weights.copy_(self.learner.phase.step_weights)
            graph.replay()
            return outputs
        if self.eager_steps.get(key, 0) < self.warmup_steps:  # a real step, on a side stream as capture needs
            self.eager_steps[key] = self.eager_steps.get(key, 0) + 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self._body(tasks, self.learner.phase.step_weights)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        static_tasks = tuple(t.clone() for t in tasks)
        weights = self.learner.phase.step_weights
        static_weights = None if weights is None else weights.clone()
        graph = torch.cuda.CUDAGraph()
        gc.collect()  # garbage holding an older graph goes now: destroying a graph during a capture invalidates it
        collecting = gc.isenabled()  # (cudaErrorStreamCaptureInvalidated): no collection until the capture ends
        gc.disable()
        try:
            with torch.cuda.graph(graph):  # its own memory pool: replaying one graph never touches another's outputs
                outputs = self._body(static_tasks, static_weights)
        finally:
            if collecting:
                gc.enable()
        self.graphs[key] = (graph, static_tasks, static_weights, outputs)
        graph.replay()  # capture records the work without running it: this replay is this step
        return outputs
