"""The inner-loop rule API.

A rule is a small bundle of pure functions, in the spirit of optax:

* ``init_rule_params(params) -> rule_params``: the rule's *learnable* tensors
  (learning rates, preconditioners), created once and trained by the outer
  optimizer together with the initialization. Empty for plain SGD.
* ``init(params) -> state``: per-task state at the start of adaptation
  (momentum buffers, step counters); ``()`` when there is none.
* ``step(params, grads, state, rule_params, step_index) -> (params, state)``:
  one inner update. No in-place ops, so it is differentiable and vmappable.

``params`` and ``grads`` hold only the parameters the rule adapts
(``rule.adapts(name)``); the rest stay at their meta-learned values.

Two optional hooks cover rules that need more than the mean gradient:

* ``per_sample=True``: ``step`` receives per-sample gradients, each shaped
  ``[n_support, *param.shape]`` (``vmap(grad)`` over the support samples, nested
  inside the vmap over tasks), instead of the gradient of the mean loss.
* ``at_step(params, rule_params, step_index) -> params``: the parameters the
  *forward pass* sees at inner step ``step_index`` (all of them, adapted or not),
  e.g. MAML++'s per-step batch-norm weights. Default: unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meta.types import Params

State = Any


def _no_state(params: Params) -> State:
    return ()


def _no_rule_params(params: Params) -> Params:
    return {}


def _adapt_all(name: str) -> bool:
    return True


def _same_params(params: Params, rule_params: Params, step_index: int) -> Params:
    return params


@dataclass(frozen=True)
class InnerRule:
    """An inner-loop update rule (see the module docstring)."""

    name: str
    step: Callable[[Params, Params, State, Params, int], tuple[Params, State]]
    init: Callable[[Params], State] = _no_state
    init_rule_params: Callable[[Params], Params] = _no_rule_params
    adapts: Callable[[str], bool] = _adapt_all
    first_order: bool = False
    per_sample: bool = False
    at_step: Callable[[Params, Params, int], Params] = _same_params


def first_order(rule: InnerRule) -> InnerRule:
    """The same rule with its inner gradients detached (first-order MAML and friends)."""
    inner_step = rule.step

    def step(params: Params, grads: Params, state: State, rule_params: Params, i: int):
        return inner_step(params, {k: g.detach() for k, g in grads.items()}, state, rule_params, i)

    return dataclasses.replace(rule, name=f"first_order({rule.name})", step=step, first_order=True)


def masked(rule: InnerRule, adapts: Callable[[str], bool], label: str = "mask") -> InnerRule:
    """The same rule, adapting only the parameters whose name passes ``adapts`` (e.g. ANIL's head)."""
    outer = rule.adapts
    return dataclasses.replace(
        rule, name=f"{label}({rule.name})", adapts=lambda name: outer(name) and adapts(name)
    )


RuleFactory = Callable[..., InnerRule]

#: Every registered rule factory. Each must build a working rule when called
#: with no arguments; tests check every entry under both drivers.
RULES: dict[str, RuleFactory] = {}


def register_rule(name: str) -> Callable[[RuleFactory], RuleFactory]:
    """Decorator that adds a rule factory to :data:`RULES` under ``name``."""

    def decorate(factory: RuleFactory) -> RuleFactory:
        if name in RULES:
            raise ValueError(f"rule {name!r} is already registered")
        RULES[name] = factory
        return factory

    return decorate


def build_rule(name: str, **kwargs: Any) -> InnerRule:
    """Build a registered rule by name."""
    if name not in RULES:
        raise ValueError(f"unknown inner rule {name!r}; registered: {sorted(RULES)}")
    return RULES[name](**kwargs)
