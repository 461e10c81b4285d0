"""FAD: Flatness-Aware Minimization for Domain Generalization (Zhang, Xu, Yu, Dong, Tian & Cui, ICCV 2023)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from genie_dg.optim.flatness import Closure, FlatnessAwareOptimizer, gradients, move_to


class FAD(FlatnessAwareOptimizer):
    """Minimises ``L + alpha * R0 + beta * R1``: zeroth-order flatness
    ``R0(theta) = max_{||e|| <= rho} L(theta + e) - L(theta)`` (SAM's sharpness) and first-order
    flatness ``R1(theta) = rho * max_{||e|| <= rho} ||grad L(theta + e)||`` (GAM's) together.

    FAD's point is doing so with first-order information only: every Hessian-vector product
    is replaced by a finite difference of gradients with step ``rho``,
    ``rho * H(x) u ~ grad L(x + rho u) - grad L(x)``, and the gradient SAM needs for ``R0``
    doubles as the difference that gives the direction of ``grad ||grad L||``::

        g0 = grad L(theta)
        g1 = grad L(theta + rho * g0 / (||g0|| + xi))        # grad of R0 ~ g1 - g0 (SAM)
        adv = theta + rho * (g1 - g0) / (||g1 - g0|| + xi)   # g1 - g0 ~ rho * grad ||grad L(theta)||
        g2 = grad L(adv)
        g3 = grad L(adv + rho * g2 / (||g2|| + xi))          # grad of R1 ~ g3 - g2
        base_optimizer steps from theta with the gradient  g0 + alpha * (g1 - g0) + beta * (g3 - g2)

    Four forward/backward passes per step, no second derivatives (so no ``create_graph``).
    Returns the loss at ``theta``. ``alpha = 1, beta = 0`` is SAM; ``alpha = 0`` is GAM's
    update with both Hessian-vector products taken as finite differences.

    ``base_optimizer`` is the optimizer class that makes the update, built with
    ``base_kwargs`` (``lr``, ``weight_decay``, ...).

    Caveat: a reconstruction. FAD has no public code and its algorithm text was not available,
    so this follows the paper's stated objective; the passes match the authors' accelerated GAM
    (github.com/xxgege/GAM), which however uses two radii and a GSAM-style gradient
    decomposition in place of the plain weighted sum above. Defaults are ours, not the paper's.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        alpha: float = 0.5,
        beta: float = 0.5,
        perturb_eps: float = 1e-12,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0 or alpha < 0 or beta < 0:
            raise ValueError(f"FAD needs rho, alpha and beta >= 0, got rho={rho}, alpha={alpha}, beta={beta}")
        super().__init__(params, base_optimizer, perturb_eps, **base_kwargs)
        self.rho = rho
        self.alpha = alpha
        self.beta = beta

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:
        loss = self._evaluate(closure)
        params = self._params_with_grad()
        origin = [p.detach().clone() for p in params]
        g0 = gradients(params)
        move_to(params, origin, [self.rho * u for u in self._unit(g0)])
        self._evaluate(closure)
        g1 = gradients(params)
        sharpness = [b - a for a, b in zip(g0, g1)]
        to_adversarial = [self.rho * u for u in self._unit(sharpness)]
        move_to(params, origin, to_adversarial)
        self._evaluate(closure)
        g2 = gradients(params)
        move_to(params, origin, to_adversarial, [self.rho * u for u in self._unit(g2)])
        self._evaluate(closure)
        g3 = gradients(params)
        move_to(params, origin)
        direction = [
            a + self.alpha * s + self.beta * (d - c) for a, s, c, d in zip(g0, sharpness, g2, g3)
        ]
        self._step_base(params, direction)
        return loss
