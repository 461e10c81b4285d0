"""SAM (Foret et al., ICLR 2021), pytorch-optimizer's, with the closure contract of ``torch.optim``."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_optimizer
import torch


class SAM(pytorch_optimizer.SAM):
    """Sharpness-Aware Minimization around a base optimizer (``base_optimizer`` is its class).

    pytorch-optimizer's ``SAM.step(closure)`` expects the gradient at the current weights to be
    computed before the call. Lightning's automatic optimization (and ``torch.optim``'s contract)
    computes nothing before ``step``: it passes a closure that runs the forward and backward
    pass. This subclass evaluates the closure once at the current weights, then runs
    pytorch-optimizer's step unchanged: perturb by ``rho * g / ||g||``, evaluate the closure
    again there, restore the weights and step the base optimizer with that second gradient.
    Two forward/backward passes per step; returns the loss at the unperturbed weights.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        if closure is None:
            raise pytorch_optimizer.base.exception.NoClosureError(str(self))
        with torch.enable_grad():
            loss = closure()
        super().step(closure)
        return loss
