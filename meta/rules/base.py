"""The inner-loop rule API, shaped like optax, and the rule every other builds on: MAML's plain SGD (:func:`sgd`,
at the end).

A rule is a small bundle of pure functions:

* ``init_rule_params(params) -> rule_params``: the rule's *learnable* tensors (step sizes, preconditioners),
  created once and trained by the outer optimizer together with the initialization. Empty for plain SGD.
* ``init(params) -> state``: per-task state at the start of adaptation, a typed ``NamedTuple``
  (:class:`EmptyState` when there is none).
* ``update(grads, state, params, rule_params, i) -> (updates, state)``: the updates of one inner step (optax's
  ``update(updates, state, params)`` with the rule's learnable tensors and the step index ``i``, a Python int,
  added). No in-place ops, so it is differentiable and vmappable. :func:`apply_updates` adds them to the
  parameters; a parameter without an update stays as it is.

Rules compose: :func:`chain` feeds one rule's updates to the next as its gradients (the per-sample-clipped SGD is
``chain(clip_per_sample(clip), sgd(lr))``); :func:`first_order` detaches the inner gradients; :func:`masked`
adapts only some parameters.

``params`` and ``grads`` hold only the parameters the rule adapts (``rule.adapts(name)``); the rest stay at their
meta-learned values. Two optional hooks cover rules that need more than the mean gradient:

* ``per_sample=True``: ``update`` receives per-sample gradients, each shaped ``[n_support, *param.shape]``
  (``vmap(grad)`` over the support samples, nested inside the vmap over tasks), instead of the gradient of the mean
  loss, and returns updates shaped like the parameters.
* ``at_step(params, rule_params, i) -> params``: the parameters the *forward pass* sees at inner step ``i`` (all
  of them, adapted or not), e.g. MAML++'s per-step batch-norm weights. Default: unchanged.

**Factory conventions** (every factory in this package follows them): every argument has a default, so
``factory()`` builds a working rule; a rule with one scalar step size takes ``learnable: bool = False``, which
makes it a meta-learned tensor ``rule_params["lr"]``; no factory takes ``first_order`` (wrap the rule with
:func:`first_order`). A new rule is one file in ``meta/rules/`` with a factory decorated by
:func:`register_rule`: importing :mod:`meta.rules` imports every module in the package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from meta.types import Params


class EmptyState(NamedTuple):
    """The state of a rule without any."""


class ChainState(NamedTuple):
    """The state of a :func:`chain`: one state per chained rule."""

    states: tuple


#: a rule's per-task state: a NamedTuple of tensor dicts (or of other states)
State = tuple


def _no_state(params: Params) -> EmptyState:
    return EmptyState()


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
    update: Callable[[Params, State, Params, Params, int], tuple[Params, State]]
    init: Callable[[Params], State] = _no_state
    init_rule_params: Callable[[Params], Params] = _no_rule_params
    adapts: Callable[[str], bool] = _adapt_all
    first_order: bool = False
    per_sample: bool = False
    at_step: Callable[[Params, Params, int], Params] = _same_params


def apply_updates(params: Params, updates: Params) -> Params:
    """``params + updates`` (optax's ``apply_updates``); parameters without an update are returned unchanged."""
    return {k: p + updates[k] if k in updates else p for k, p in params.items()}


def scalar_lr(lr: float, learnable: bool) -> Callable[[Params], Params]:
    """``init_rule_params`` of a rule with one scalar step size: ``{"lr": lr}`` as a meta-learned tensor if
    ``learnable``, else nothing (the rule then reads ``rule_params.get("lr", lr)``, the constant)."""

    def init_rule_params(params: Params) -> Params:
        if not learnable:
            return {}
        return {"lr": torch.tensor(float(lr), dtype=next(iter(params.values())).dtype)}

    return init_rule_params


def first_order(rule: InnerRule) -> InnerRule:
    """The same rule with its inner gradients detached (first-order MAML and friends)."""
    inner_update = rule.update

    def update(grads: Params, state: State, params: Params, rule_params: Params, i: int) -> tuple[Params, State]:
        return inner_update({k: g.detach() for k, g in grads.items()}, state, params, rule_params, i)

    return dataclasses.replace(rule, name=f"first_order({rule.name})", update=update, first_order=True)


def with_initial_state(rule: InnerRule, state: State | None) -> InnerRule:
    """The same rule, starting every adaptation from ``state`` instead of ``init(params)`` (a state carried from
    task to task: Reptile's persistent inner Adam, ``inner.persistent_state``); ``rule`` itself when ``state`` is
    None. ``state`` must hold the adapted parameters' names, as ``rule.init`` would."""
    if state is None:
        return rule
    return dataclasses.replace(rule, init=lambda params: state)


def masked(rule: InnerRule, adapts: Callable[[str], bool], label: str = "mask") -> InnerRule:
    """The same rule, adapting only the parameters whose name passes ``adapts`` (e.g. ANIL's head)."""
    outer = rule.adapts
    return dataclasses.replace(
        rule, name=f"{label}({rule.name})", adapts=lambda name: outer(name) and adapts(name)
    )


def chain(*rules: InnerRule, name: str | None = None) -> InnerRule:
    """Rules applied in turn, each taking the previous one's updates as its gradients (optax's ``chain``).

    Only the first may be ``per_sample`` (it turns per-sample gradients into one update per parameter). Their
    learnable tensors are merged (names must differ), their ``at_step`` hooks applied in order, and a parameter
    adapts if every rule adapts it."""
    if any(r.per_sample for r in rules[1:]):
        raise ValueError("only the first rule of a chain may take per-sample gradients")

    def init(params: Params) -> ChainState:
        return ChainState(tuple(r.init(params) for r in rules))

    def init_rule_params(params: Params) -> Params:
        merged: Params = {}
        for r in rules:
            own = r.init_rule_params(params)
            if merged.keys() & own.keys():
                raise ValueError(f"chained rules share learnable tensor names {sorted(merged.keys() & own.keys())}")
            merged |= own
        return merged

    def update(grads: Params, state: ChainState, params: Params, rule_params: Params, i: int):
        states = []
        for r, s in zip(rules, state.states):
            grads, s = r.update(grads, s, params, rule_params, i)
            states.append(s)
        return grads, ChainState(tuple(states))

    def at_step(params: Params, rule_params: Params, i: int) -> Params:
        for r in rules:
            params = r.at_step(params, rule_params, i)
        return params

    return InnerRule(
        name=name or f"chain({', '.join(r.name for r in rules)})", update=update, init=init,
        init_rule_params=init_rule_params, adapts=lambda k: all(r.adapts(k) for r in rules),
        first_order=any(r.first_order for r in rules), per_sample=rules[0].per_sample, at_step=at_step,
    )


RuleFactory = Callable[..., InnerRule]

#: Every registered rule factory. Each must build a working rule when called
#: with no arguments; tests check every entry under every driver.
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


# ---- the base rule: plain gradient descent, the MAML inner loop ---------------------------------------------


@register_rule("sgd")
def sgd(lr: float = 0.4, learnable: bool = False) -> InnerRule:
    """MAML's inner SGD: updates ``-lr * g``. ``learnable=True`` makes the one step size a meta-parameter."""

    def update(grads: Params, state: EmptyState, params: Params, rule_params: Params, i: int):
        alpha = rule_params.get("lr", lr)
        return {k: -alpha * grads[k] for k in params}, state

    return InnerRule(name="sgd", update=update, init_rule_params=scalar_lr(lr, learnable))
