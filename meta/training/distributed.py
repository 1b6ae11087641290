"""Meta-training across processes, GPUs and machines with ``torch.distributed`` (launched by ``torchrun``).

One run, N ranks. Every rank draws the *whole* global meta-batch from the same seeded generator (so the task
stream is the single-process one), keeps its contiguous share of the tasks (:meth:`DistContext.share`: shares
differ by at most one task), and computes the meta-gradient of its share with any driver. The per-share means are
weighted by ``local / global`` task counts and summed across ranks with one bucketed ``all_reduce`` per dtype
(model and rule gradients, the loss and accuracy sums used for logging, and two control numbers), so every rank
holds the meta-gradient of the global mean query loss and takes the same optimizer step.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) :func:`init_distributed` returns the single-process context, whose
collectives are identities, and the training script runs its ordinary single-process step.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from meta.learner import MetaLearner, Tasks
from meta.training.errors import RunError


class DistributedError(RuntimeError):
    """A collective failed: another rank died, or stopped answering within ``dist.timeout_s``."""


#: the environment ``torchrun`` sets for every rank (``python -m torch.distributed.run``)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run: ``rank`` of ``world`` processes, ``local_rank`` on its machine.

    ``world == 1`` is the single-process run: every collective below returns its input unchanged and no process
    group exists. Passed explicitly to whatever shards work or exchanges tensors (no global switch).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = 0.0

    def _run(self, what: str, collective: Callable, *args, **kwargs) -> Any:
        """``collective(*args, **kwargs)``, its failure turned into a one-line :class:`DistributedError`."""
        try:
            return collective(*args, **kwargs)
        except RuntimeError as error:  # torch.distributed.DistBackendError and the backends' own errors
            first = (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed: another rank died or did not answer within "
                f"dist.timeout_s={self.timeout_s:g} s ({first}). Checkpoints are written atomically: the last "
                f"one in out_dir is intact; continue with resume=true") from None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and prints."""
        return self.rank == 0

    def share(self, total: int, rank: int | None = None) -> slice:
        """The contiguous slice of ``total`` items that ``rank`` (default: this one) owns: the first
        ``total % world`` ranks take one item more than the others."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(total, self.world)
        start = rank * base + min(rank, extra)
        return slice(start, start + base + (rank < extra))

    # ---- collectives (identities on one process) -------------------------------------------------------------
    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The element-wise sums over ranks of ``tensors``, bucketed: one flat buffer and one ``all_reduce`` per
        (dtype, device) instead of one call per tensor. Returns new tensors shaped as the inputs."""
        if self.world == 1:
            return list(tensors)
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for indices in _buckets(tensors):
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
            self._run("all_reduce", dist.all_reduce, flat, op=dist.ReduceOp.SUM)
            offset = 0
            for i in indices:
                n = tensors[i].numel()
                out[i] = flat[offset:offset + n].view_as(tensors[i])
                offset += n
        return out

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values (bucketed like :meth:`all_reduce_sum`)."""
        if self.world == 1:
            return
        tensors = list(tensors)
        for indices in _buckets(tensors):
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
            self._run("broadcast", dist.broadcast, flat, src=src)
            offset = 0
            with torch.no_grad():
                for i in indices:
                    n = tensors[i].numel()
                    tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
                    offset += n

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (any picklable value; tensors come back on the CPU or this rank's GPU)."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == src else None]
        self._run("broadcast", dist.broadcast_object_list, box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        self._run("all_gather", dist.all_gather_object, gathered, obj)
        return gathered

    def agree(self, error: str | None) -> None:
        """End every rank (:class:`RunError` with the message) if any rank passes an error message; a check that
        fails on one rank thus stops the whole run instead of leaving the others waiting in a collective."""
        errors = [(rank, e) for rank, e in enumerate(self.all_gather_object(error)) if e]
        if errors:
            rank, message = errors[0]
            raise RunError(message if self.world == 1 else f"rank {rank} of {self.world}: {message}")

    def close(self) -> None:
        """Leave the process group once every rank is done with it (no-op on one process)."""
        if self.world > 1 and dist.is_initialized():
            self._run("barrier", dist.barrier)
            dist.destroy_process_group()


def _buckets(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return list(groups.values())


def torchrun_world() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} is not an integer; launch with torchrun, or unset it") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world} must be >= 1; launch with torchrun, or unset it")
    return world


def init_distributed(timeout_s: float, cuda: bool) -> DistContext:
    """The run's :class:`DistContext`, read from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``). With ``WORLD_SIZE > 1`` it joins the process group: gloo for CPU tensors
    and, for a ``cuda`` run, also NCCL for CUDA tensors (``cpu:gloo,cuda:nccl``, after selecting GPU
    ``LOCAL_RANK``). ``timeout_s`` bounds how long a collective waits for a rank that died or hangs before this
    rank fails (``dist.timeout_s``)."""
    world = torchrun_world()
    if world == 1:
        return DistContext()
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
                         f"(python -m torch.distributed.run --nproc_per_node N scripts/train_maml.py ...)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    backend = "gloo"
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                             f"start at most that many processes per node (--nproc_per_node), one per GPU, or "
                             f"train on CPUs with device=cpu")
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), rank=rank, world_size=world)
    return DistContext(rank=rank, world=world, local_rank=local_rank, backend=backend, timeout_s=timeout_s)


def one_line_errors(previous: Callable = sys.excepthook) -> Callable:
    """An exception hook (for ``sys.excepthook``) that prints a :class:`DistributedError` as its one-line message
    (the process still exits with status 1) and passes anything else to ``previous``."""

    def hook(kind, error, traceback) -> None:
        if isinstance(error, DistributedError):
            print(f"distributed error: {error}", file=sys.stderr, flush=True)
        else:
            previous(kind, error, traceback)

    return hook


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for CUDA runs on several processes, else ``device``."""
    if device.type == "cuda" and ctx.world > 1:
        return torch.device("cuda", ctx.local_rank)
    return device


class DistributedMetaStep:
    """``step(tasks) -> (loss, accuracy)`` for the *global* meta-batch ``tasks``: this rank's share's
    meta-gradient (``learner.meta_gradient`` on ``driver``), weighted and summed across ranks in one bucketed
    ``all_reduce``, written with ``learner.write_grads``, then ``optimizer.step()`` (the same on every rank).

    Returns 1-element tensors holding the global mean query loss and accuracy (what the single-process loop logs
    as ``loss.mean()``). Two control numbers ride in the same buffer, so they cost no extra collective:

    * ``signals``: a list that a signal handler appends to on this rank; when any rank has one, every rank
      appends to :attr:`stop_agreed` after the same step, so all stop together;
    * the ``auto`` driver's number of cached choices: when it grows (a new setting was timed), every rank
      adopts rank 0's choice, so all ranks run the same strategy from then on.
    """

    def __init__(self, learner: MetaLearner, optimizer: torch.optim.Optimizer, ctx: DistContext, *, driver: str,
                 chunk_size: int | None, signals: list[int]) -> None:
        self.learner, self.optimizer, self.ctx = learner, optimizer, ctx
        self.driver, self.chunk_size, self.signals = driver, chunk_size, signals
        self.stop_agreed: list[int] = []
        self._choices_total = 0.0
        self._synced: set = set(learner.auto_driver.choices)

    def __call__(self, tasks: Tasks) -> tuple[torch.Tensor, torch.Tensor]:
        total = len(tasks[0])
        local = tuple(t[self.ctx.share(total)] for t in tasks)
        result = self.learner.meta_gradient(local, driver=self.driver, chunk_size=self.chunk_size)
        weight = len(local[0]) / total  # each share's gradient is the mean over its own tasks
        grads = {**{("p", k): v * weight for k, v in result.grads.items()},
                 **{("r", k): v * weight for k, v in result.rule_grads.items()}}
        dtype = result.loss.dtype
        stats = torch.stack([result.loss.sum() / total, result.accuracy.to(dtype).sum() / total,
                             torch.tensor(float(bool(self.signals)), dtype=dtype, device=result.loss.device),
                             torch.tensor(float(len(self.learner.auto_driver.choices)), dtype=dtype,
                                          device=result.loss.device)])
        *summed, stats = self.ctx.all_reduce_sum([*grads.values(), stats])
        summed = dict(zip(grads, summed))
        self.learner.write_grads(result._replace(
            grads={k: summed[("p", k)] for k in result.grads},
            rule_grads={k: summed[("r", k)] for k in result.rule_grads},
        ))
        self.optimizer.step()
        _, _, stopping, choices = stats.tolist()  # one synchronization per step (the collective has one anyway)
        if stopping > 0 and not self.stop_agreed:
            self.stop_agreed.append(int(stopping))
        if choices != self._choices_total:  # the same on every rank: a new auto setting was timed somewhere
            self._choices_total = choices
            self._adopt_main_choices()
        return stats[0:1], stats[1:2]

    def _adopt_main_choices(self) -> None:
        """Every rank takes rank 0's newest ``auto`` choice for the settings it timed since the last sync (ranks
        with a different share size time a different setting key, hence rank 0's choice, not its key)."""
        choices = self.learner.auto_driver.choices
        new = [key for key in choices if key not in self._synced]
        main = [choices[key] for key in new] or list(choices.values())[-1:]
        main = self.ctx.broadcast_object(main)
        for i, key in enumerate(new):
            if main:
                choices[key] = main[min(i, len(main) - 1)]
        self._synced.update(new)


def check_distributable(cfg: Any, ctx: DistContext) -> str | None:
    """Why this config cannot run on ``ctx.world`` ranks (a one-line message naming key and fix), or None."""
    if ctx.world == 1:
        return None
    if cfg.train.meta_batch < ctx.world:
        return (f"train.meta_batch={cfg.train.meta_batch} is smaller than the {ctx.world} processes: some ranks "
                f"would get no task; raise train.meta_batch or start at most {cfg.train.meta_batch} processes "
                f"(--nproc_per_node)")
    if cfg.model.norm_stats == "running":
        return (f"model.norm_stats=running updates the running statistics from the training episodes one after "
                f"another on one process; {ctx.world} ranks would each update theirs from their own share. Launch "
                f"without torchrun")
    if cfg.inner.persistent_state:
        return (f"inner.persistent_state=true carries the inner rule's state from task to task in order, on one "
                f"process, not {ctx.world}; set inner.persistent_state=false, or launch without torchrun")
    if cfg.train.cuda_graph:
        return (f"train.cuda_graph=true runs on one process only (its captured step has no collectives), not on "
                f"{ctx.world}; set train.cuda_graph=false, or launch without torchrun")
    return None
