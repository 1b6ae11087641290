"""iMAML (Rajeswaran et al. 2019): proximal inner problem, implicit meta-gradient by conjugate gradient.

Per task, ``phi = argmin_phi L_support(phi) + lam/2 |phi - theta|^2`` (approximately, by ``steps`` of the
inner rule), and the meta-gradient is ``(I + H/lam)^-1 grad L_query(phi)`` with ``H`` the support-loss
Hessian at ``phi``, solved by CG on Hessian-vector products (forward-over-reverse ``jvp`` of ``grad``).
Nothing is backpropagated through the inner loop, so memory does not grow with the inner steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, jvp

from meta.drivers import Direction, TaskBatchResult
from meta.learner import MetaLearner, Tasks
from meta.models.functional import functional_forward
from meta.rules.base import InnerRule, apply_updates
from meta.types import Params, Task, as_task_batch

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


class IMAML(MetaLearner):
    """iMAML on the shared core: same interface as :class:`MetaLearner`. ``evaluate`` adapts with the
    proximal term ``test_lam`` (default ``lam``; the official code measures accuracy with 0).
    The rule adapts every parameter and must have no learnable parameters. Nothing is backpropagated through
    the inner loop, so it runs on the ``direction`` row of :data:`meta.drivers.DRIVERS` (``vmap``, ``loop``, ``auto``;
    its Hessian-vector products use forward-mode AD, which cannot run on several threads at once)."""

    outer_kind = "direction"
    refused_drivers = {"loop_threads": "its Hessian-vector products use forward-mode AD (torch.func.jvp), whose "
                                       "dual level is process-global, so two threads running it break it"}

    def __init__(self, *args, lam: float = 2.0, cg_steps: int = 5, test_lam: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(self.rule_params):
            raise ValueError(f"iMAML cannot train the rule parameters of {self.rule.name}; use a rule without any")
        self.lam, self.cg_steps = lam, cg_steps
        self.test_lam = lam if test_lam is None else test_lam

    def task_fn(self, inner_steps: int | None = None, rule: InnerRule | None = None, step_weights=None) -> Callable:
        """Per-task ``(query loss, (accuracy, phi))`` after the test-time proximal solve (no meta-gradient)."""
        return self._task(inner_steps, rule, with_grad=False, lam=self.test_lam)

    def _task(self, inner_steps: int | None, rule: InnerRule | None, with_grad: bool, lam: float) -> Callable:
        forward, loss_fn = functional_forward(self.model), self.loss_fn
        steps = self.inner_steps if inner_steps is None else inner_steps
        rule = self.rule if rule is None else rule

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
            return Direction(loss, accuracy, implicit_meta_grad(support_loss, query_loss, phi, lam, self.cg_steps), {},
                             phi)

        return fn

    @torch.no_grad()
    def meta_gradient(self, tasks: Tasks, driver: str = "vmap", chunk_size: int | None = None) -> TaskBatchResult:
        """Per-task proximal adaptation and implicit gradients on ``driver``, averaged over tasks."""
        self._check_driver(driver, second_order=True)
        return self.run_driver(self._task(None, None, with_grad=True, lam=self.lam), as_task_batch(tasks), driver,
                               chunk_size)
