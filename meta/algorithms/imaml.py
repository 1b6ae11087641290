"""iMAML (Rajeswaran et al. 2019): proximal inner problem, implicit meta-gradient by conjugate gradient.

Per task, ``phi = argmin_phi L_support(phi) + lam/2 |phi - theta|^2`` (approximately, by ``steps`` of the
inner rule), and the meta-gradient is ``(I + H/lam)^-1 grad L_query(phi)`` with ``H`` the support-loss
Hessian at ``phi``, solved by CG on Hessian-vector products (forward-over-reverse ``jvp`` of ``grad``).
Nothing is backpropagated through the inner loop, so memory does not grow with the inner steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp

from meta.algorithms.maml import check_adapted_head, check_no_inner_loop_knobs
from meta.drivers import Direction, TaskFn
from meta.learner import MetaLearner, OuterStrategy, Phase
from meta.models.networks import functional_forward
from meta.rules.base import InnerRule, apply_updates
from meta.types import Params, Task

Objective = Callable[[Params], torch.Tensor]


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a / b, and 0 where b == 0 (CG has converged exactly); no data-dependent branch, so vmappable
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """``steps`` CG iterations for ``A x = b`` from ``x = 0`` (A symmetric, positive definite for the
    usual guarantees; like the official iMAML code it runs the fixed count regardless).
    A fixed iteration count and no data-dependent branches, so it runs under vmap."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r, p = dict(b), dict(b)
    rr = _dot(r, r)
    for _ in range(steps):
        ap = matvec(p)
        alpha = _ratio(rr, _dot(p, ap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = _dot(r, r)
        beta = _ratio(rr_new, rr)
        p = {k: r[k] + beta * p[k] for k in p}
        rr = rr_new
    return x


def proximal_adapt(
    support_loss: Objective, rule: InnerRule, theta: Params, rule_params: Params, lam: float, steps: int
) -> Params:
    """``steps`` updates of ``rule`` on ``support_loss(phi) + lam/2 |phi - theta|^2`` from ``phi = theta``."""

    def objective(phi: Params) -> torch.Tensor:
        return support_loss(phi) + 0.5 * lam * sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)

    phi, state = theta, rule.init(theta)
    for i in range(steps):
        updates, state = rule.update(grad(objective)(phi), state, phi, rule_params, i)
        phi = apply_updates(phi, updates)
    return phi


def implicit_meta_grad(
    support_loss: Objective, query_loss: Objective, phi: Params, lam: float, cg_steps: int
) -> Params:
    """``(I + H/lam)^-1 grad query_loss(phi)``, ``H`` the Hessian of ``support_loss`` at ``phi``, by CG."""
    phi = {k: v.detach() for k, v in phi.items()}

    def matvec(v: Params) -> Params:
        hv = jvp(grad(support_loss), (phi,), (v,))[1]
        return {k: v[k] + hv[k] / lam for k in v}

    return conjugate_gradient(matvec, grad(query_loss)(phi), cg_steps)


class Implicit(OuterStrategy):
    """iMAML's outer strategy: per task, ``steps`` of the rule on the proximal inner problem (strength ``lam``),
    then the implicit meta-gradient by ``cg_steps`` of CG. :meth:`eval_fn` adapts with the proximal term
    ``test_lam`` (default ``lam``; the official code measures accuracy with 0). The rule adapts every parameter
    and must have no learnable parameters."""

    kind = "direction"
    refused = {"loop_threads": "its Hessian-vector products use forward-mode AD (torch.func.jvp), whose dual level "
                               "is process-global, so two threads running it break it"}
    trains_rule_params = False
    name = "iMAML"

    def __init__(self, lam: float = 2.0, cg_steps: int = 5, test_lam: float | None = None) -> None:
        self.lam, self.cg_steps = lam, cg_steps
        self.test_lam = lam if test_lam is None else test_lam

    def second_order(self, learner: MetaLearner, rule: InnerRule) -> bool:
        return True  # Hessian-vector products

    def train_fn(self, learner: MetaLearner, rule: InnerRule, phase: Phase) -> TaskFn:
        return self._task(learner, rule, learner.inner_steps, with_grad=True, lam=self.lam)

    def eval_fn(self, learner: MetaLearner, rule: InnerRule, steps: int) -> TaskFn:
        """Per-task ``(query loss, (accuracy, phi))`` after the test-time proximal solve (no meta-gradient)."""
        return self._task(learner, rule, steps, with_grad=False, lam=self.test_lam)

    def _task(self, learner: MetaLearner, rule: InnerRule, steps: int, with_grad: bool, lam: float) -> TaskFn:
        forward, loss_fn, cg_steps = functional_forward(learner.model), learner.loss_fn, self.cg_steps

        def fn(params: Params, rule_params: Params, buffers: Params, task: Task):
            sx, sy, qx, qy = task

            def support_loss(p: Params) -> torch.Tensor:
                return loss_fn(forward(p, buffers, sx), sy)

            def query_loss(p: Params) -> torch.Tensor:
                return loss_fn(forward(p, buffers, qx), qy)

            phi = proximal_adapt(support_loss, rule, params, rule_params, lam, steps)
            logits = forward(phi, buffers, qx)
            loss, accuracy = loss_fn(logits, qy), (logits.argmax(-1) == qy).to(logits.dtype).mean()
            if not with_grad:
                return loss, (accuracy, phi)
            return Direction(loss, accuracy, implicit_meta_grad(support_loss, query_loss, phi, lam, cg_steps), {}, phi)

        return fn


def IMAML(  # builds a MetaLearner, named like the algorithm
    model: nn.Module, rule: InnerRule, inner_steps: int, lam: float = 2.0, cg_steps: int = 5,
    test_lam: float | None = None, **parts,
) -> MetaLearner:
    """A :class:`MetaLearner` with the :class:`Implicit` outer strategy."""
    return MetaLearner(model, rule, inner_steps, outer=Implicit(lam, cg_steps, test_lam), **parts)


def check_config(cfg: Any) -> None:
    """``algorithm=imaml``'s own checks: a MAML head, an inner loop of its own."""
    check_adapted_head(cfg)
    check_no_inner_loop_knobs(cfg)


def build(cfg: Any, model: nn.Module, rule: InnerRule) -> MetaLearner:
    """``algorithm=imaml``'s learner."""
    return IMAML(model, rule, cfg.inner.steps, lam=cfg.imaml.lam, cg_steps=cfg.imaml.cg_steps,
                 test_lam=cfg.imaml.test_lam)
