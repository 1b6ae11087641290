"""``MetaLearner``: one kind of object for every algorithm, composed of parts.

A learner is a model, an inner loop (rule, steps, inner mini-batch, inner-loss reduction), an **outer strategy**
(how a task's share of the outer direction is formed: :class:`Backprop` through the inner loop, in second or
first order as the rule says, or Reptile's difference, iMAML's implicit gradient, ProtoNets' prototypes, in
:mod:`meta.algorithms`) and an optional per-iteration **schedule** (MAML++'s multi-step loss and
derivative-order annealing). Every strategy runs through the one driver table :data:`meta.drivers.DRIVERS`, so
every learner honours every driver of its row or refuses it, with the reason, before any work.

The module reads top to bottom as one training step: the per-task function (:func:`task_loss`: adapt on the
support set with :func:`adapt_steps`, score on the query set), then the learner that hands it to a driver
(:meth:`MetaLearner.meta_gradient`) and takes the outer step (:meth:`MetaLearner.train_step`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

from meta.drivers import (
    VECTORIZED_DRIVERS,
    AutoDriver,
    Driver,
    Problem,
    TaskBatchResult,
    TaskFn,
    drivers_of,
    vmap_forward,
)
from meta.models.networks import (
    autograd_grads,
    buffers_of,
    detached,
    find_fused_norms,
    functional_forward,
    parameters_of,
)
from meta.per_sample import _check_no_batch_statistics
from meta.rules.base import InnerRule, State, apply_updates, first_order
from meta.types import Forward, LossFn, Params, Task

# ---- the per-task function: adapt on the support set, score on the query set --------------------

#: How the inner (support) loss reduces its per-example losses: ``mean``, or ``sum_over_shots``, the sum divided
#: by the shots K, as cbfinn/maml's ``xent`` (utils.py:L56-L58 divides the per-example cross-entropy by
#: ``update_batch_size``) under ``tf.gradients`` of that vector (maml.py:L90, L101), which sums it.
#: ``sum``: the sum over the batch, as openai/supervised-reptile's ``minimize`` of the per-example loss vector
#: (models.py L27-30: ``sparse_softmax_cross_entropy_with_logits``, no mean), i.e. ``batch`` times the mean.
INNER_LOSS_REDUCTIONS = ("mean", "sum_over_shots", "sum")


def inner_loss_scale(reduction: str, ways: int, batch: int, support: int) -> float:
    """The factor that turns the mean loss over an inner batch of ``batch`` examples into ``reduction``.

    ``sum_over_shots`` is ``sum / K`` with ``K = support / ways`` shots per class, i.e. ``ways * batch /
    support`` times the mean: ``ways`` (N) on the full support set, less on an inner mini-batch."""
    if reduction == "mean":
        return 1.0
    if reduction == "sum_over_shots":
        return ways * batch / support
    if reduction == "sum":
        return float(batch)
    raise ValueError(f"unknown inner loss reduction {reduction!r}; choose one of {INNER_LOSS_REDUCTIONS}")


def support_batch(x: torch.Tensor, step: int, batch_size: int | None) -> torch.Tensor:
    """The support examples inner step ``step`` uses: all of them (``batch_size`` None or at least their number),
    else the next ``batch_size`` in order, cycling (step ``i`` starts at ``i * batch_size`` modulo their number).
    Samplers shuffle the support set, so these are mini-batches drawn without replacement (Reptile's)."""
    n = x.shape[0]
    if batch_size is None or batch_size >= n:
        return x
    start = step * batch_size % n
    if start + batch_size <= n:
        return x[start : start + batch_size]
    return torch.cat([x[start:], x[: start + batch_size - n]])


def adapt_steps(
    forward: Forward,
    rule: InnerRule,
    params: Params,
    rule_params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    loss_fn: LossFn = F.cross_entropy,
    batch_size: int | None = None,
    reduction: str = "mean",
    autograd_inner: bool = False,
) -> Generator[Params, None, State]:
    """Yield all parameters after each of ``steps`` inner updates of ``rule`` on ``(x, y)``; return the rule's final
    state (the generator's return value: ``StopIteration.value``, or the value of ``yield from``).

    With ``rule.per_sample`` the rule gets per-sample gradients ``[n, *shape]``
    (``vmap(grad)`` over the samples, which nests inside a vmap over tasks). With ``batch_size``, each step
    sees only a mini-batch of the support set (:func:`support_batch`). ``reduction`` (:data:`INNER_LOSS_REDUCTIONS`)
    scales the mean support loss ``loss_fn`` by :func:`inner_loss_scale` (the ways are the logits' last
    dimension); per-sample gradients get the same factor, so that their mean, which the per-sample rules
    average, is the gradient of the reduced loss (and a clipping bound applies to the scaled gradients).
    ``autograd_inner``: inner gradients from ``torch.autograd.grad`` (``create_graph`` unless the rule is first
    order) instead of ``torch.func.grad``, the same numbers with less overhead for per-task loops differentiated by
    plain autograd (the ``loop_autograd`` driver); never under ``torch.vmap`` or ``torch.func`` transforms.
    """
    fast = {k: v for k, v in params.items() if rule.adapts(k)}
    frozen = {k: v for k, v in params.items() if k not in fast}
    support = x.shape[0]

    def support_loss(fast: Params, i: int, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
        logits = forward(rule.at_step({**frozen, **fast}, rule_params, i), buffers, x)
        loss = loss_fn(logits, y)
        return loss if reduction == "mean" else loss * inner_loss_scale(reduction, logits.shape[-1], batch, support)

    def sample_loss(fast: Params, i: int, xi: torch.Tensor, yi: torch.Tensor, batch: int) -> torch.Tensor:
        return support_loss(fast, i, xi.unsqueeze(0), yi.unsqueeze(0), batch)

    state = rule.init(fast)
    all_x, all_y = x, y
    for i in range(steps):
        x, y = support_batch(all_x, i, batch_size), support_batch(all_y, i, batch_size)
        n = x.shape[0]
        if rule.per_sample:
            grads = torch.vmap(grad(lambda f, xi, yi: sample_loss(f, i, xi, yi, n)), in_dims=(None, 0, 0))(fast, x, y)
        elif autograd_inner:
            (grads,) = autograd_grads(support_loss(fast, i, x, y, n), (fast,), create_graph=not rule.first_order)
        else:
            grads = grad(support_loss)(fast, i, x, y, n)
        updates, state = rule.update(grads, state, fast, rule_params, i)
        fast = apply_updates(fast, updates)
        yield {k: fast.get(k, v) for k, v in params.items()}
    return state


def adapt(
    forward: Forward,
    rule: InnerRule,
    params: Params,
    rule_params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    **options: Any,
) -> Params:
    """:func:`adapt_steps` run to the end (``options``: its keyword arguments): all parameters after the last
    inner update (``params`` themselves when ``steps`` is 0)."""
    return run_to_end(adapt_steps(forward, rule, params, rule_params, buffers, x, y, steps, **options), params)[0]


def run_to_end(steps: Generator[Params, None, State], params: Params) -> tuple[Params, State]:
    """Exhaust an :func:`adapt_steps` generator: the last parameters it yielded (``params`` if none) and the rule's
    final state (its return value)."""
    adapted = params
    while True:
        try:
            adapted = next(steps)
        except StopIteration as stop:
            return adapted, stop.value


def task_loss(
    params: Params,
    rule_params: Params,
    buffers: Params,
    task: Task,
    *,
    forward: Forward,
    rule: InnerRule,
    steps: int,
    loss_fn: LossFn = F.cross_entropy,
    step_weights: torch.Tensor | None = None,
    batch_size: int | None = None,
    inner_reduction: str = "mean",
    autograd_inner: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, Params]]:
    """Query loss of one ``task`` after adapting on its support set (in mini-batches of ``batch_size``, if given).

    The inner (support) loss reduces by ``inner_reduction`` (:data:`INNER_LOSS_REDUCTIONS`); the query loss is
    always ``loss_fn``, a mean. ``autograd_inner``: see :func:`adapt_steps`.

    With ``step_weights`` (shape ``[steps]``, the multi-step loss of MAML++) the
    loss is ``sum_i step_weights[i] * query_loss(after step i)``; accuracy is
    always that after the last step. The query forward after step ``i`` sees
    ``rule.at_step(params, rule_params, i)`` (step ``0`` when ``steps == 0``).

    Returns ``(loss, (accuracy, adapted_params))`` so it can be wrapped by
    ``torch.func.grad(..., has_aux=True)``.
    """
    support_x, support_y, query_x, query_y = task
    if step_weights is not None and step_weights.shape != (steps,):
        raise ValueError(f"step_weights must have shape ({steps},), got {tuple(step_weights.shape)}")

    def query(adapted: Params, i: int) -> torch.Tensor:
        return forward(rule.at_step(adapted, rule_params, i), buffers, query_x)

    adapted, loss = params, 0.0
    for i, adapted in enumerate(
        adapt_steps(forward, rule, params, rule_params, buffers, support_x, support_y, steps, loss_fn, batch_size,
                    inner_reduction, autograd_inner)
    ):
        if step_weights is not None and i < steps - 1:
            loss = loss + step_weights[i] * loss_fn(query(adapted, i), query_y)
    logits = query(adapted, max(steps - 1, 0))
    final = loss_fn(logits, query_y)
    loss = final if step_weights is None else loss + step_weights[-1] * final
    accuracy = (logits.argmax(dim=-1) == query_y).to(logits.dtype).mean()
    return loss, (accuracy, adapted)


# ---- the learner: a batch of tasks through a driver, then the outer step ------------------------

#: what ``meta_gradient`` and ``evaluate`` accept: a :class:`Task` batch, or any 4-tuple of its tensors
Tasks = Task | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def as_task_batch(tasks: Task | tuple[torch.Tensor, ...]) -> Task:
    """``tasks`` as a :class:`Task` batch, after checking it is ``(support_x, support_y, query_x, query_y)`` with a
    leading task dimension, ``[tasks, examples, ...]`` images and ``[tasks, examples]`` integer labels (no device
    sync)."""
    tasks = tuple(tasks)
    if len(tasks) != 4:
        raise ValueError(f"tasks must be (support_x, support_y, query_x, query_y), got {len(tasks)} tensors")
    sx, sy, qx, qy = tasks
    for name, labels in (("support_y", sy), ("query_y", qy)):
        if labels.dim() != 2 or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"{name} must be integer class labels shaped [tasks, examples], got {labels.dtype} "
                             f"{tuple(labels.shape)} (one task needs a leading task dimension of 1)")
    if sx.shape[:2] != sy.shape or qx.shape[:2] != qy.shape or sx.shape[0] != qx.shape[0]:
        raise ValueError(f"task tensors disagree: support_x {tuple(sx.shape)}, support_y {tuple(sy.shape)}, "
                         f"query_x {tuple(qx.shape)}, query_y {tuple(qy.shape)}; expected [tasks, examples, ...] "
                         f"images with [tasks, examples] labels and the same number of tasks in all four")
    return Task(*tasks)


class FusedNormError(ValueError):
    """A fused norm layer would give wrong second-order meta-gradients under vmap."""


class Phase(NamedTuple):
    """The outer loop's switches at one iteration, as a schedule sets them (default: none switched on)."""

    #: query-loss weight after each inner step (MAML++'s multi-step loss); None: the last step only
    step_weights: torch.Tensor | None = None
    #: inner gradients detached this iteration (MAML++'s derivative-order annealing)
    first_order: bool = False


#: ``schedule(step, total) -> Phase``: the phase of iteration ``step`` of ``total`` (from 0); stateless
Schedule = Callable[[int, int], Phase]


class OuterStrategy:
    """How a learner turns a task into its share of the outer direction. Subclasses set :attr:`kind` (their row of
    :data:`meta.drivers.DRIVERS`), :attr:`refused` (drivers of that row they cannot run, with the reason) and
    implement :meth:`train_fn` and :meth:`eval_fn`."""

    #: ``backprop`` (the driver differentiates the per-task loss) or ``direction`` (the per-task function returns
    #: its own direction)
    kind: str = "backprop"
    #: drivers of that row this strategy refuses, with the reason
    refused: dict[str, str] = {}
    #: whether it needs rule, steps and the rule's learnable tensors
    uses_rule: bool = True
    #: whether it can train the rule's learnable tensors (nothing differentiates them otherwise)
    trains_rule_params: bool = True

    #: the strategy's name, for messages and the ``auto`` driver's settings
    name: str = "outer strategy"

    def check(self, learner: MetaLearner) -> None:
        """Refuse, at construction, a learner this strategy cannot train."""
        if not self.trains_rule_params and len(learner.rule_params):
            raise ValueError(f"{self.name} cannot train the rule parameters of {learner.rule.name}; use a rule "
                             f"without any")

    def train_fn(self, learner: MetaLearner, rule: InnerRule, phase: Phase) -> TaskFn:
        """The per-task function :meth:`MetaLearner.meta_gradient` maps with ``rule`` in ``phase``."""
        raise NotImplementedError

    def eval_fn(self, learner: MetaLearner, rule: InnerRule | None, steps: int) -> TaskFn:
        """The per-task ``(loss, (accuracy, adapted))`` :meth:`MetaLearner.evaluate` maps (no meta-gradient), on
        inner mini-batches of ``learner.test_batch_size``."""
        return learner.task_fn(steps, rule, batch_size=learner.test_batch_size)

    def second_order(self, learner: MetaLearner, rule: InnerRule) -> bool:
        """Whether a meta-gradient differentiates through inner gradients (for the fused-norm check)."""
        return self.uses_rule and not rule.first_order and learner.inner_steps > 0


class Backprop(OuterStrategy):
    """MAML's outer strategy: the gradient of the query loss through the inner loop, second order, or first order
    when the rule is wrapped by :func:`meta.rules.first_order` (FOMAML) or the phase says so (MAML++)."""

    name = "MAML"

    def train_fn(self, learner: MetaLearner, rule: InnerRule, phase: Phase) -> TaskFn:
        return learner.task_fn(rule=rule, step_weights=phase.step_weights)


def _to_key(name: str) -> str:
    if "__" in name:
        raise ValueError(f"rule parameter name {name!r} must not contain '__'")
    return name.replace(".", "__")


def _from_key(key: str) -> str:
    return key.replace("__", ".")


class MetaLearner(nn.Module):
    """Meta-learns a model's initialization together with the learnable tensors of an inner rule.

    ``learner.parameters()`` is everything the outer optimizer trains: the model's parameters and the rule's
    parameters (``learner.rule_params``). The parts (module docstring): ``rule``, ``inner_steps``,
    ``inner_batch_size`` (each inner step uses that many support examples, Reptile's mini-batches; None: all),
    ``test_batch_size`` (the same at validation and test; None: ``inner_batch_size``),
    ``inner_loss_reduction`` (``mean``, cbfinn/maml's ``sum_over_shots`` or supervised-reptile's ``sum``),
    ``outer`` (default :class:`Backprop`) and ``schedule`` (None: every iteration is the default :class:`Phase`).
    """

    def __init__(
        self,
        model: nn.Module,
        rule: InnerRule | None,
        inner_steps: int,
        loss_fn: LossFn = F.cross_entropy,
        *,
        outer: OuterStrategy | None = None,
        schedule: Schedule | None = None,
        inner_batch_size: int | None = None,
        test_batch_size: int | None = None,
        inner_loss_reduction: str = "mean",
    ) -> None:
        super().__init__()
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        if inner_loss_reduction not in INNER_LOSS_REDUCTIONS:
            raise ValueError(f"unknown inner loss reduction {inner_loss_reduction!r}; choose one of "
                             f"{INNER_LOSS_REDUCTIONS}")
        self.outer = Backprop() if outer is None else outer
        if self.outer.uses_rule and rule is None:
            raise ValueError(f"{self.outer.name} needs an inner rule")
        self.model = model
        self.rule = rule
        self.inner_steps = inner_steps
        self.loss_fn = loss_fn
        self.schedule = schedule
        self.inner_batch_size = inner_batch_size
        #: the inner mini-batch at validation and test (None: ``inner_batch_size``; supervised-reptile's --eval-batch)
        self.test_batch_size = test_batch_size
        self.inner_loss_reduction = inner_loss_reduction
        #: this iteration's switches (:meth:`set_iteration`)
        self.phase = Phase()
        if rule is not None and rule.per_sample:
            _check_no_batch_statistics(model)
        initial = detached(parameters_of(model))
        own = rule.init_rule_params(initial) if rule is not None else {}
        self.rule_params = nn.ParameterDict({_to_key(k): nn.Parameter(v.clone()) for k, v in own.items()})
        self.outer.check(self)
        self._fused_norms = find_fused_norms(model)
        #: the ``auto`` driver, with its cached per-setting choices
        self.auto_driver = AutoDriver()

    def drivers(self) -> dict[str, Driver]:
        """The drivers this learner runs on, by name (``auto`` chooses among them)."""
        return drivers_of(self.outer.kind, tuple(self.outer.refused))

    def supported_drivers(self) -> tuple[str, ...]:
        """The driver names this learner accepts: its drivers and ``auto`` (unless its strategy refuses it)."""
        return (*self.drivers(), *(() if "auto" in self.outer.refused else ("auto",)))

    def functional_state(self) -> tuple[Params, Params, Params]:
        """``(params, rule_params, buffers)`` as name -> tensor dicts."""
        rule_params = {_from_key(k): v for k, v in self.rule_params.items()}
        return parameters_of(self.model), rule_params, buffers_of(self.model)

    def _detached_state(self) -> tuple[Params, Params, Params]:
        # torch.func differentiates on its own; no outer autograd graph is needed.
        return tuple(detached(tree) for tree in self.functional_state())

    def task_fn(
        self,
        inner_steps: int | None = None,
        rule: InnerRule | None = None,
        step_weights: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> TaskFn:
        """The per-task function :func:`task_loss` with this learner's model, inner loop and loss bound
        (``inner_steps``, ``rule`` and the inner mini-batch ``batch_size`` default to the learner's)."""
        return functools.partial(
            task_loss,
            forward=functional_forward(self.model),
            rule=self.rule if rule is None else rule,
            steps=self.inner_steps if inner_steps is None else inner_steps,
            loss_fn=self.loss_fn,
            step_weights=step_weights,
            batch_size=self.inner_batch_size if batch_size is None else batch_size,
            inner_reduction=self.inner_loss_reduction,
        )

    def active_rule(self) -> InnerRule | None:
        """The rule this iteration adapts with: the learner's, made first order if the phase says so."""
        if self.rule is not None and self.phase.first_order and not self.rule.first_order:
            return first_order(self.rule)
        return self.rule

    def set_iteration(self, step: int, total: int) -> None:
        """Set the phase of iteration ``step`` of ``total`` (from 0) from the schedule, if there is one. The
        training script calls it before each meta-iteration; stateless, so a resumed run calls it again."""
        if self.schedule is None:
            return
        phase = self.schedule(step, total)
        if phase.step_weights is not None:
            reference = next(self.model.parameters())
            phase = phase._replace(step_weights=phase.step_weights.to(device=reference.device, dtype=reference.dtype))
        self.phase = phase

    def describe(self) -> str:
        """The work one meta-gradient does beyond the task shapes (what the ``auto`` driver keys its choice on):
        the outer kind first, which names the candidates, then the strategy, rule, steps and inner mini-batch."""
        rule = self.active_rule()
        return (f"{self.outer.kind} {self.outer.name} rule={rule.name if rule else None} steps={self.inner_steps} "
                f"batch={self.inner_batch_size}")

    def _check_driver(self, driver: str) -> None:
        if driver not in self.supported_drivers():
            reason = f" ({self.outer.refused[driver]})" if driver in self.outer.refused else ""
            raise ValueError(f"unknown driver {driver!r} for {self.outer.name}{reason}; choose one of "
                             f"{sorted(self.supported_drivers())}")
        if driver in VECTORIZED_DRIVERS and self.outer.second_order(self, self.active_rule()) and self._fused_norms:
            layers = ", ".join(f"{path} ({kind})" for path, kind in self._fused_norms)
            raise FusedNormError(
                f"fused norm layers give wrong second-order meta-gradients under vmap on this torch "
                f"(pytorch/functorch#534): {layers}. Use meta.models.TaskBatchNorm (norm='task_bn') or "
                f"nn.GroupNorm (norm='group') instead, or the 'loop' driver, or a first-order rule."
            )

    def meta_gradient(self, tasks: Tasks, driver: str = "vmap", chunk_size: int | None = None) -> TaskBatchResult:
        """Per-task losses/accuracies and the outer direction (the meta-gradient of the mean query loss, or the
        strategy's own) for a batch of tasks shaped ``[tasks, n*k, ...]``, on ``driver``."""
        self._check_driver(driver)
        tasks = as_task_batch(tasks)
        problem = Problem(self.outer.train_fn(self, self.active_rule(), self.phase), *self._detached_state(), tasks,
                          chunk_size)
        # direction strategies differentiate nothing through the drivers (their per-task functions use torch.func)
        with torch.no_grad() if self.outer.kind == "direction" else contextlib.nullcontext():
            if driver == "auto":
                return self.auto_driver(problem, self.describe(), self.drivers())
            return self.drivers()[driver](problem)

    def write_grads(self, result: TaskBatchResult) -> None:
        """Store a result's meta-gradients in ``.grad`` of the model and rule parameters (copied into the
        existing ``.grad`` tensors where there are some, so that their buffers stay put, as CUDA graphs need)."""
        grads = [(p, result.grads[name]) for name, p in self.model.named_parameters()]
        grads += [(p, result.rule_grads[_from_key(key)]) for key, p in self.rule_params.items()]
        for p, g in grads:
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.copy_(g)

    def train_step(
        self, optimizer: torch.optim.Optimizer, tasks: Tasks, driver: str = "vmap", chunk_size: int | None = None
    ) -> TaskBatchResult:
        """One outer step: :meth:`meta_gradient`, :meth:`write_grads`, then ``optimizer.step()``."""
        result = self.meta_gradient(tasks, driver=driver, chunk_size=chunk_size)
        self.write_grads(result)
        optimizer.step()
        return result

    @torch.no_grad()
    def evaluate(
        self,
        tasks: Tasks,
        inner_steps: int | None = None,
        rule: InnerRule | None = None,
        chunk_size: int | None = None,
        transductive: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task query loss and accuracy after adaptation (vmapped, no meta-gradient).

        ``inner_steps`` and ``rule`` override the training ones, e.g. MAML's 3 test-time steps. ``transductive``
        False: each query is predicted alone with the support set (:func:`non_transductive`).
        """
        steps = self.inner_steps if inner_steps is None else inner_steps
        rule = self.rule if rule is None else rule
        task_fn = self.outer.eval_fn(self, rule, steps)
        if not transductive:
            task_fn = non_transductive(task_fn, functional_forward(self.model), rule, steps, self.loss_fn)
        return vmap_forward(Problem(task_fn, *self._detached_state(), as_task_batch(tasks), chunk_size))


def non_transductive(task_fn: TaskFn, forward: Forward, rule: InnerRule | None, steps: int, loss_fn: LossFn) -> TaskFn:
    """An evaluation ``task_fn`` whose query predictions are made one query at a time: the adapted model's forward of
    the support set plus that one query, its last row (batch statistics of that batch only; openai/supervised-reptile
    reptile.py L129-133, ``_test_predictions`` with ``transductive=False``). Adaptation is ``task_fn``'s, on the
    support set only (reptile.py L115-119); its own transductive query loss is replaced."""

    def fn(params: Params, rule_params: Params, buffers: Params, task: Task):
        _, (_, adapted) = task_fn(params, rule_params, buffers, task)
        support_x, _, query_x, query_y = task
        weights = adapted if rule is None else rule.at_step(adapted, rule_params, max(steps - 1, 0))
        logits = per_query_logits(forward, weights, buffers, support_x, query_x)
        return loss_fn(logits, query_y), ((logits.argmax(dim=-1) == query_y).to(logits.dtype).mean(), adapted)

    return fn


def per_query_logits(
    forward: Forward, weights: Params, buffers: Params, support_x: torch.Tensor, query_x: torch.Tensor
) -> torch.Tensor:
    """Each query's logits from the forward of the support set plus that query alone (its last row): the
    non-transductive prediction of :func:`non_transductive`, ``[queries, ways]``."""
    return torch.vmap(lambda q: forward(weights, buffers, torch.cat([support_x, q.unsqueeze(0)]))[-1])(query_x)
