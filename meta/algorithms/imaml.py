"""iMAML (Rajeswaran et al. 2019): proximal inner problem, implicit meta-gradient by conjugate gradient.

Two formulations (``formulation``, the config's ``imaml.formulation``):

* ``paper``: per task, ``phi = argmin_phi L_support(phi) + lam/2 |phi - theta|^2`` (approximately, by ``steps``
  of the inner rule on that proximal objective), and the meta-gradient is ``(I + H/lam)^-1 grad L_query(phi)``
  with ``H`` the support-loss Hessian at ``phi``.
* ``code``: what the official code (aravindr93/imaml_dev @6a2a669) computes. ``steps`` of the inner rule on the
  support loss alone from ``theta`` (examples/omniglot_implicit_maml.py L107, ``learn_task`` without
  regularization: implicit_maml/learner_model.py L84-103), then one more update of the rule on the gradient of
  ``lam/2 |phi - theta|^2``, the pull-back (omniglot_implicit_maml.py L108-112; with SGD at ``lr``:
  ``phi - lr * lam * (phi - theta)``). With ``cg_steps <= 1`` the direction is ``grad L_query(phi)`` itself, no
  CG (L121-122).

In both, the CG operator is ``(1 + regu_coef) v + H v / (lam + lam_damping)`` (learner_model.py L143-153; the
code's ``regu_coef`` is its ``--cg_damping``, L124, and ``lam_damping`` 10; both 0 give the paper's
``v + H v / lam``), solved from ``x = 0`` by ``cg_steps`` of CG on Hessian-vector products
(forward-over-reverse ``jvp`` of ``grad``) that stop updating once ``r.r < cg_tol`` (utils.py L71-90; 0: never).
The right-hand side is the query-loss gradient at the adapted ``phi``, the Hessian that of the support loss at
``phi``, and the batch direction the mean over tasks (omniglot_implicit_maml.py L117-127).
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


FORMULATIONS = ("paper", "code")


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int, tol: float = 0.0) -> Params:
    """``steps`` CG iterations for ``A x = b`` from ``x = 0`` (A symmetric, positive definite for the
    usual guarantees). After an iteration whose new residual has ``r.r < tol``, ``x`` stops changing (the official
    code's ``residual_tol`` break, implicit_maml/utils.py L88-90); ``tol=0`` runs the fixed count regardless.
    A fixed iteration count and no data-dependent branches (the stop is a mask), so it runs under vmap."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r, p = dict(b), dict(b)
    rr = _dot(r, r)
    active = torch.ones_like(rr, dtype=torch.bool)
    for _ in range(steps):
        ap = matvec(p)
        alpha = torch.where(active, _ratio(rr, _dot(p, ap)), torch.zeros_like(rr))  # 0 once stopped: x stays
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = _dot(r, r)
        beta = _ratio(rr_new, rr)
        p = {k: r[k] + beta * p[k] for k in p}
        rr = rr_new
        active = active & (rr_new >= tol)
    return x


def _descend(
    objective: Objective, rule: InnerRule, theta: Params, rule_params: Params, steps: int
) -> tuple[Params, Any]:
    """``steps`` updates of ``rule`` on ``objective`` from ``theta``: the parameters and the rule's state."""
    phi, state = theta, rule.init(theta)
    for i in range(steps):
        updates, state = rule.update(grad(objective)(phi), state, phi, rule_params, i)
        phi = apply_updates(phi, updates)
    return phi, state


def proximal_adapt(
    support_loss: Objective, rule: InnerRule, theta: Params, rule_params: Params, lam: float, steps: int
) -> Params:
    """``steps`` updates of ``rule`` on ``support_loss(phi) + lam/2 |phi - theta|^2`` from ``phi = theta``
    (the paper's inner problem)."""

    def objective(phi: Params) -> torch.Tensor:
        return support_loss(phi) + 0.5 * lam * sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)

    return _descend(objective, rule, theta, rule_params, steps)[0]


def pullback_adapt(
    support_loss: Objective, rule: InnerRule, theta: Params, rule_params: Params, lam: float, steps: int
) -> Params:
    """The official code's inner loop: ``steps`` updates of ``rule`` on ``support_loss`` alone from ``theta``
    (omniglot_implicit_maml.py L107), then one more update of the same rule, its state carried on, on the gradient
    ``lam (phi - theta)`` of ``lam/2 |phi - theta|^2``: the pull-back (L108-112; measure_accuracy.py L75-79)."""
    phi, state = _descend(support_loss, rule, theta, rule_params, steps)
    updates, _ = rule.update({k: lam * (phi[k] - theta[k]) for k in phi}, state, phi, rule_params, steps)
    return apply_updates(phi, updates)


def implicit_meta_grad(
    support_loss: Objective, query_loss: Objective, phi: Params, lam: float, cg_steps: int,
    regu_coef: float = 0.0, lam_damping: float = 0.0, cg_tol: float = 0.0,
) -> Params:
    """``A^-1 grad query_loss(phi)`` by ``cg_steps`` of CG (stopping once ``r.r < cg_tol``), with
    ``A v = (1 + regu_coef) v + H v / (lam + lam_damping)`` and ``H`` the Hessian of ``support_loss`` at ``phi``.
    ``regu_coef = lam_damping = 0`` is the paper's ``(I + H/lam)^-1``; the official code's operator
    (learner_model.py L143-153) has ``regu_coef`` = its ``--cg_damping`` and ``lam_damping = 10``."""
    phi = {k: v.detach() for k, v in phi.items()}
    scale, divisor = 1.0 + regu_coef, lam + lam_damping

    def matvec(v: Params) -> Params:
        hv = jvp(grad(support_loss), (phi,), (v,))[1]
        return {k: scale * v[k] + hv[k] / divisor for k in v}

    return conjugate_gradient(matvec, grad(query_loss)(phi), cg_steps, cg_tol)


class Implicit(OuterStrategy):
    """iMAML's outer strategy: per task, the inner loop of ``formulation`` (``paper``: ``steps`` of the rule on the
    proximal problem of strength ``lam``; ``code``: ``steps`` on the support loss, then the pull-back step, see the
    module docstring), then the implicit meta-gradient by ``cg_steps`` of CG on the operator
    ``(1 + regu_coef) v + H v / (lam + lam_damping)``. :meth:`eval_fn` adapts the same way with ``test_lam``
    (default ``lam``; the official code measures accuracy with 0). The rule adapts every parameter and must have
    no learnable parameters."""

    kind = "direction"
    refused = {"loop_threads": "its Hessian-vector products use forward-mode AD (torch.func.jvp), whose dual level "
                               "is process-global, so two threads running it break it"}
    trains_rule_params = False
    name = "iMAML"

    def __init__(
        self, lam: float = 2.0, cg_steps: int = 5, test_lam: float | None = None, formulation: str = "paper",
        regu_coef: float = 0.0, lam_damping: float = 0.0, cg_tol: float = 0.0,
    ) -> None:
        if formulation not in FORMULATIONS:
            raise ValueError(f"unknown iMAML formulation {formulation!r}; choose one of {FORMULATIONS}")
        self.lam, self.cg_steps, self.formulation = lam, cg_steps, formulation
        self.test_lam = lam if test_lam is None else test_lam
        self.regu_coef, self.lam_damping, self.cg_tol = regu_coef, lam_damping, cg_tol

    def second_order(self, learner: MetaLearner, rule: InnerRule) -> bool:
        return True  # Hessian-vector products

    def train_fn(self, learner: MetaLearner, rule: InnerRule, phase: Phase) -> TaskFn:
        return self._task(learner, rule, learner.inner_steps, with_grad=True, lam=self.lam)

    def eval_fn(self, learner: MetaLearner, rule: InnerRule, steps: int) -> TaskFn:
        """Per-task ``(query loss, (accuracy, phi))`` after the test-time adaptation (no meta-gradient)."""
        return self._task(learner, rule, steps, with_grad=False, lam=self.test_lam)

    def _direction(self, support_loss: Objective, query_loss: Objective, phi: Params) -> Params:
        if self.formulation == "code" and self.cg_steps <= 1:  # omniglot_implicit_maml.py L121-122: no CG
            return grad(query_loss)({k: v.detach() for k, v in phi.items()})
        return implicit_meta_grad(support_loss, query_loss, phi, self.lam, self.cg_steps, self.regu_coef,
                                  self.lam_damping, self.cg_tol)

    def _task(self, learner: MetaLearner, rule: InnerRule, steps: int, with_grad: bool, lam: float) -> TaskFn:
        forward, loss_fn = functional_forward(learner.model), learner.loss_fn
        adapt = proximal_adapt if self.formulation == "paper" else pullback_adapt

        def fn(params: Params, rule_params: Params, buffers: Params, task: Task):
            sx, sy, qx, qy = task

            def support_loss(p: Params) -> torch.Tensor:
                return loss_fn(forward(p, buffers, sx), sy)

            def query_loss(p: Params) -> torch.Tensor:
                return loss_fn(forward(p, buffers, qx), qy)

            phi = adapt(support_loss, rule, params, rule_params, lam, steps)
            logits = forward(phi, buffers, qx)
            loss, accuracy = loss_fn(logits, qy), (logits.argmax(-1) == qy).to(logits.dtype).mean()
            if not with_grad:
                return loss, (accuracy, phi)
            return Direction(loss, accuracy, self._direction(support_loss, query_loss, phi), {}, phi)

        return fn


def IMAML(  # builds a MetaLearner, named like the algorithm
    model: nn.Module, rule: InnerRule, inner_steps: int, lam: float = 2.0, cg_steps: int = 5,
    test_lam: float | None = None, formulation: str = "paper", regu_coef: float = 0.0, lam_damping: float = 0.0,
    cg_tol: float = 0.0, **parts,
) -> MetaLearner:
    """A :class:`MetaLearner` with the :class:`Implicit` outer strategy."""
    outer = Implicit(lam, cg_steps, test_lam, formulation, regu_coef, lam_damping, cg_tol)
    return MetaLearner(model, rule, inner_steps, outer=outer, **parts)


def check_config(cfg: Any) -> None:
    """``algorithm=imaml``'s own checks: a MAML head, an inner loop of its own, and ``imaml.*`` values whose CG
    operator is positive definite."""
    check_adapted_head(cfg)
    check_no_inner_loop_knobs(cfg)
    imaml = cfg.imaml
    if imaml.cg_steps < 1:
        raise ValueError(f"imaml.cg_steps={imaml.cg_steps}: CG needs at least 1 step (0 would give a zero "
                         f"meta-gradient); set imaml.cg_steps >= 1")
    for key in ("lam", "test_lam", "regu_coef", "lam_damping", "cg_tol"):
        value = imaml[key]
        if value is not None and value < 0:
            raise ValueError(f"imaml.{key}={value} must be >= 0")
    if imaml.lam + imaml.lam_damping <= 0:
        raise ValueError(f"imaml.lam + imaml.lam_damping = {imaml.lam + imaml.lam_damping}: the CG operator divides "
                         f"the Hessian by it; set imaml.lam > 0 (or imaml.lam_damping > 0)")


def build(cfg: Any, model: nn.Module, rule: InnerRule) -> MetaLearner:
    """``algorithm=imaml``'s learner."""
    i = cfg.imaml
    return IMAML(model, rule, cfg.inner.steps, lam=i.lam, cg_steps=i.cg_steps, test_lam=i.test_lam,
                 formulation=i.formulation, regu_coef=i.regu_coef, lam_damping=i.lam_damping, cg_tol=i.cg_tol)
