"""FAD: Flatness-Aware Minimization for Domain Generalization (Zhang, Xu, Yu, Dong, Tian & Cui, ICCV 2023)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from genie_dg.optim.flatness import Closure, FlatnessAwareOptimizer, gradients, move_to


class FAD(FlatnessAwareOptimizer):
    """Flatness-aware minimization: zeroth-order flatness (SAM's sharpness) and first-order
    flatness (GAM's gradient norm in a ball) together, with first-order information only.

    Four gradients with one radius ``rho`` per step (``xi`` keeps a normalisation finite)::

        g0 = grad L(theta)
        g1 = grad L(theta + rho * g0 / (||g0|| + xi))          # h0 = g1 - g0 ~ rho * H g0/||g0||
        adv = theta + rho * (g1 - g0) / (||g1 - g0|| + xi)     # h0 points to grad ||grad L||
        g2 = grad L(adv)
        g3 = grad L(adv + rho * g2 / (||g2|| + xi))            # h1 = g3 - g2
        base_optimizer steps from theta with  g0 + beta * (alpha * h0 + (1 - alpha) * h1)

    ``alpha`` shares the flatness term between its zeroth-order part (``h0``, SAM's correction)
    and its first-order part (``h1``, GAM's), ``beta`` weighs flatness against the loss.
    Defaults ``rho = 0.05, alpha = 0.5, beta = 1``. ``alpha = 1, beta = 1`` is SAM (``g1``).
    Four forward/backward passes per step, no second derivatives (so no ``create_graph``).
    Returns the loss at ``theta``. ``base_optimizer`` is the optimizer class that makes the
    update, built with ``base_kwargs`` (``lr``, ``weight_decay``, ...).

    Caveat: a **reconstruction**. No copy of FAD's algorithm text or code was reachable. This
    follows the best available description, a reading of the paper that agrees with the
    structure of the GAM authors' accelerated algorithm (github.com/xxgege/GAM, Algorithm 2 of
    the GAM paper): the four gradients above with one radius, and the update direction
    ``g0 + beta * (alpha * h0 + (1 - alpha) * h1)`` with ``rho = 0.05, alpha = 0.5, beta = 1``
    (genie-dg issue 18). Compare with the paper before trusting FAD numbers.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        alpha: float = 0.5,
        beta: float = 1.0,
        perturb_eps: float = 1e-12,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0 or not 0 <= alpha <= 1 or beta < 0:
            raise ValueError(
                f"FAD needs rho >= 0, 0 <= alpha <= 1 and beta >= 0, got rho={rho}, alpha={alpha}, beta={beta}"
            )
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
        alpha, beta = self.alpha, self.beta
        direction = [a + beta * (alpha * h0 + (1 - alpha) * (d - c)) for a, h0, c, d in zip(g0, sharpness, g2, g3)]
        self._step_base(params, direction)
        return loss
