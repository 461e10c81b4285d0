"""GAM: Gradient norm Aware Minimization (Zhang, Xu, Yu, Zou & Cui, CVPR 2023)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from genie_dg.optim.flatness import Closure, FlatnessAwareOptimizer, gradients, move_to


class GAM(FlatnessAwareOptimizer):
    """Minimises ``L(theta) + alpha * R1(theta)``, with the first-order flatness
    ``R1(theta) = rho * max_{||e|| <= rho} ||grad L(theta + e)||``, as the paper's Algorithm 1
    (equations 7 and 8), with exact Hessian-vector products::

        g      = grad L(theta)
        f      = H(theta) g / (||g|| + xi)                   # = grad ||grad L||   (eq. 7)
        adv    = theta + rho * f / (||f|| + xi)              # maximises ||grad L|| in the ball (eq. 8)
        h_norm = rho * H(adv) g_adv / (||g_adv|| + xi),  g_adv = grad L(adv)
        base_optimizer steps from theta with the gradient  g + alpha * h_norm

    Two forward/backward passes and two Hessian-vector products per step. The closure's
    backward pass must keep the graph of the gradient (``loss.backward(create_graph=True)``;
    ``DGModule.backward`` does so for GAM), because each Hessian-vector product
    differentiates the gradient once more. Returns the loss at ``theta``.

    ``base_optimizer`` is the optimizer class that makes the update (the paper pairs GAM with
    SGD and AdamW), built with ``base_kwargs`` (``lr``, ``weight_decay``, ...).

    The authors' repository (github.com/xxgege/GAM) does not ship this algorithm but the paper's
    Hessian-free "accelerated GAM" (Algorithm 2, Appendix D), which combines GAM with SAM: four
    gradient evaluations, finite differences with a small radius ``rho'`` in place of both
    Hessian-vector products, and a GSAM-style gradient decomposition; it is not implemented here.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.2,
        alpha: float = 0.5,
        perturb_eps: float = 1e-12,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0 or alpha < 0:
            raise ValueError(f"GAM needs rho >= 0 and alpha >= 0, got rho={rho}, alpha={alpha}")
        super().__init__(params, base_optimizer, perturb_eps, **base_kwargs)
        self.rho = rho
        self.alpha = alpha

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:
        loss = self._evaluate(closure)
        params = self._params_with_grad()
        origin = [p.detach().clone() for p in params]
        gradient = gradients(params)
        norm_ascent = hessian_vector_product(params, [p.grad for p in params], self._unit(gradient))
        perturbation = [self.rho * v for v in self._unit(norm_ascent)]
        move_to(params, origin, perturbation)
        self._evaluate(closure)
        adversarial_gradient = [p.grad for p in params]
        flatness = hessian_vector_product(
            params, adversarial_gradient, self._unit([g.detach() for g in adversarial_gradient])
        )
        move_to(params, origin)
        self._step_base(params, [g + (self.alpha * self.rho) * h for g, h in zip(gradient, flatness)])
        return loss


def hessian_vector_product(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``H v`` from gradients that still carry their graph (``backward(create_graph=True)``).

    A gradient without a graph does not depend on any parameter: its row of ``H`` is zero, and
    by symmetry so is its contribution to every other parameter's entry, so it is left out.
    """
    linked = [i for i, g in enumerate(grads) if g.requires_grad]
    if not linked:
        raise RuntimeError(
            "the gradients carry no graph, so no Hessian-vector product can be taken: back-propagate "
            "the loss with create_graph=True in the closure"
        )
    with torch.enable_grad():
        products = torch.autograd.grad(
            [grads[i] for i in linked], list(params), grad_outputs=[vectors[i] for i in linked], allow_unused=True
        )
    return [torch.zeros_like(p) if hv is None else hv.detach() for p, hv in zip(params, products)]
