"""The ``auto`` driver: the fastest exact driver for a setting, timed on its first batch and then kept."""

from __future__ import annotations

import time

import torch

from meta.drivers import Driver, Problem, TaskBatchResult

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
