"""Reptile (Nichol et al. 2018): the outer update is the mean over tasks of (adapted - initial).

With ``persistent_state`` (``inner.persistent_state``) the inner rule's state (Adam's moments and step count) is
carried from one task to the next and across meta-iterations, as openai/supervised-reptile does: its
``VariableState`` restores only ``tf.trainable_variables()`` between tasks (reptile.py L24, L62-72), so the
inner ``AdamOptimizer``'s slots and ``beta1_power``/``beta2_power`` live on. Its evaluation starts every test
task from the optimizer state of that moment and restores it afterwards (``_full_state``, every global variable:
reptile.py L25-26, L114, L122), which :meth:`PersistentReptileDifference.eval_fn` mirrors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from meta.algorithms.maml import check_adapted_head, inner_loop
from meta.drivers import Direction, TaskFn
from meta.learner import MetaLearner, OuterStrategy, Phase, adapt_steps, run_to_end
from meta.models.networks import functional_forward, parameters_of
from meta.rules.base import RULES, InnerRule, State, with_initial_state
from meta.types import Params, Task


class ReptileDifference(OuterStrategy):
    """A task's direction is ``initial - adapted`` (no meta-differentiation), so that plain SGD with learning rate
    ``eps`` on the mean is Reptile's ``theta += eps * (mean(phi) - theta)`` (``train.optimizer=sgd``). ``loss`` and
    ``accuracy`` are the query ones after adaptation, for logging. The rule must have no learnable parameters
    (nothing would train them)."""

    kind = "direction"
    trains_rule_params = False
    name = "Reptile"

    def train_fn(self, learner: MetaLearner, rule: InnerRule, phase: Phase) -> TaskFn:
        task_fn = learner.task_fn(rule=rule)

        def direction(params: Params, rule_params: Params, buffers: Params, task: Task) -> Direction:
            loss, (accuracy, adapted) = task_fn(params, rule_params, buffers, task)
            return Direction(loss, accuracy, {k: params[k] - adapted[k] for k in params}, {}, adapted)

        return direction


def state_entries(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A rule state's leaves (tensors, ints) by path (``m/features.0.conv.weight``, ``count``): NamedTuple fields,
    tuple positions and dict keys joined by ``/``. Plain data, so checkpoints load with ``weights_only``."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, tuple):
        items = zip(getattr(tree, "_fields", range(len(tree))), tree)
    else:
        return {prefix[:-1]: tree}
    return {path: leaf for key, value in items for path, leaf in state_entries(value, f"{prefix}{key}/").items()}


def state_from_entries(template: Any, entries: dict[str, Any], prefix: str = "") -> Any:
    """The inverse of :func:`state_entries`: ``template`` (a state of the same rule, e.g. ``rule.init``) with its
    leaves taken from ``entries``."""
    if isinstance(template, dict):
        return {k: state_from_entries(v, entries, f"{prefix}{k}/") for k, v in template.items()}
    if isinstance(template, tuple):
        names = getattr(template, "_fields", range(len(template)))
        values = [state_from_entries(v, entries, f"{prefix}{n}/") for n, v in zip(names, template)]
        return type(template)(*values) if hasattr(template, "_fields") else tuple(values)
    if prefix[:-1] not in entries:
        raise ValueError(f"the saved inner-rule state has no {prefix[:-1]!r}: it was saved for another rule or model")
    return entries[prefix[:-1]]


class PersistentReptileDifference(nn.Module, ReptileDifference):
    """:class:`ReptileDifference` with the inner rule's state carried from task to task (in task order) and across
    meta-iterations; every validation and test task starts from the carried state and leaves it as it is (see the
    module docstring). Tasks then depend on each other, so only the ``loop`` driver runs them. A module only to put
    the carried state in the learner's ``state_dict`` (``outer._extra_state``): checkpoints save it and a resumed
    run continues from it."""

    _sequential = "the inner rule's state is carried from task to task in order (inner.persistent_state=true)"
    refused = {"vmap": f"{_sequential}: set driver=loop", "loop_threads": f"{_sequential}: set driver=loop",
               "auto": f"{_sequential}: set driver=loop"}

    def __init__(self) -> None:
        super().__init__()
        #: the carried state: the rule's state after the last training task (None before the first: ``rule.init``)
        self.state: State | None = None
        self._loaded: dict[str, Any] | None = None  # entries from a checkpoint, made a state on first use

    def check(self, learner: MetaLearner) -> None:
        super().check(learner)
        if not state_entries(initial_state(learner.rule, parameters_of(learner.model))):
            raise ValueError(f"inner.persistent_state=true carries the inner rule's state, but rule "
                             f"{learner.rule.name!r} has none; use a rule with state (adam) or persistent_state=false")

    def carried(self, learner: MetaLearner, rule: InnerRule) -> State | None:
        """The carried state (a checkpoint's, once loaded, is rebuilt here on the template of ``rule.init``)."""
        if self._loaded is not None:
            self.state = state_from_entries(initial_state(rule, parameters_of(learner.model)), self._loaded)
            self._loaded = None
        return self.state

    def get_extra_state(self) -> dict[str, Any]:
        entries = self._loaded if self.state is None else state_entries(self.state)
        return {"state": entries}

    def set_extra_state(self, extra: dict[str, Any]) -> None:
        self.state, self._loaded = None, extra["state"]

    def train_fn(self, learner: MetaLearner, rule: InnerRule, phase: Phase) -> TaskFn:
        forward, loss_fn, steps = functional_forward(learner.model), learner.loss_fn, learner.inner_steps

        def direction(params: Params, rule_params: Params, buffers: Params, task: Task) -> Direction:
            support_x, support_y, query_x, query_y = task
            start = with_initial_state(rule, self.carried(learner, rule))
            adapted, self.state = run_to_end(adapt_steps(
                forward, start, params, rule_params, buffers, support_x, support_y, steps, loss_fn,
                learner.inner_batch_size, learner.inner_loss_reduction), params)
            logits = forward(rule.at_step(adapted, rule_params, max(steps - 1, 0)), buffers, query_x)
            accuracy = (logits.argmax(dim=-1) == query_y).to(logits.dtype).mean()
            return Direction(loss_fn(logits, query_y), accuracy, {k: params[k] - adapted[k] for k in params}, {},
                             adapted)

        return direction

    def eval_fn(self, learner: MetaLearner, rule: InnerRule, steps: int) -> TaskFn:
        return super().eval_fn(learner, with_initial_state(rule, self.carried(learner, rule)), steps)


def initial_state(rule: InnerRule, params: Params) -> State:
    """``rule.init`` of the parameters ``rule`` adapts (detached: a template or a fresh state)."""
    return rule.init({k: v.detach() for k, v in params.items() if rule.adapts(k)})


def Reptile(  # named like the algorithm
    model: nn.Module, rule: InnerRule, inner_steps: int, *, persistent_state: bool = False, **parts
) -> MetaLearner:
    """A :class:`MetaLearner` with the :class:`ReptileDifference` outer strategy (Adam with beta1 = 0 inside, in
    the paper); ``persistent_state``: :class:`PersistentReptileDifference` (the rule's state carried across tasks,
    as the paper's code does; ``loop`` driver only)."""
    outer = PersistentReptileDifference() if persistent_state else ReptileDifference()
    return MetaLearner(model, rule, inner_steps, outer=outer, **parts)


def check_config(cfg: Any) -> None:
    """``algorithm=reptile``'s own checks: an N-way head, and ``inner.persistent_state`` on the loop driver with a
    rule that has state."""
    check_adapted_head(cfg)
    if not cfg.inner.persistent_state:
        return
    if cfg.driver != "loop":
        raise ValueError(f"inner.persistent_state=true carries the inner rule's state from one task to the next, in "
                         f"order, which only driver=loop does (not driver={cfg.driver}); set driver=loop, or "
                         f"inner.persistent_state=false")
    try:
        rule = RULES[cfg.inner.rule](**cfg.inner.options)
    except (KeyError, TypeError):  # an unknown rule or option: validate() names it
        return
    if not state_entries(rule.init({"w": torch.zeros(1)})):
        raise ValueError(f"inner.persistent_state=true carries the inner rule's state, but inner.rule="
                         f"{cfg.inner.rule} has none; use inner.rule=adam, or inner.persistent_state=false")


def build(cfg: Any, model: nn.Module, rule: InnerRule) -> MetaLearner:
    """``algorithm=reptile``'s learner."""
    return Reptile(model, rule, cfg.inner.steps, persistent_state=cfg.inner.persistent_state, **inner_loop(cfg))
