"""Optimizers of genie-dg: :class:`GENIE` (:func:`register_timm` adds it to timm's factory as
``"genie"``) and the sharpness-aware baselines :class:`SAM`, :class:`GAM` and :class:`FAD`.

Two properties decide how the training loop must drive an optimizer (``DGModule`` reads them):
:func:`evaluates_closure` (``step(closure)`` runs the forward and backward pass several times,
at perturbed weights) and :func:`differentiates_gradient` (``step`` takes Hessian-vector
products, so the backward pass must keep the gradient's graph).
"""

import pytorch_optimizer
import torch

from genie_dg.optim.fad import FAD
from genie_dg.optim.gam import GAM
from genie_dg.optim.genie import GENIE, register_timm
from genie_dg.optim.sam import SAM

CLOSURE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (pytorch_optimizer.SAM, GAM, FAD)
SECOND_ORDER_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (pytorch_optimizer.AdaHessian, GAM)


def evaluates_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step(closure)`` re-evaluates the loss (SAM, GAM, FAD)."""
    return isinstance(optimizer, CLOSURE_OPTIMIZERS)


def differentiates_gradient(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` differentiates the gradient again (AdaHessian, GAM)."""
    return isinstance(optimizer, SECOND_ORDER_OPTIMIZERS)


__all__ = [
    "CLOSURE_OPTIMIZERS",
    "FAD",
    "GAM",
    "GENIE",
    "SAM",
    "SECOND_ORDER_OPTIMIZERS",
    "differentiates_gradient",
    "evaluates_closure",
    "register_timm",
]
