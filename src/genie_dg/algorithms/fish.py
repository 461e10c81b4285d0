"""Fish (Shi et al., 2021, "Gradient Matching for Domain Generalization") as DomainBed
defines it."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import (
    AlgorithmOutput,
    DGAlgorithm,
    DomainBatch,
    OptimizerFactory,
    StepContext,
    build_inner_optimizer,
    hparam,
    refuse_second_order,
)
from genie_dg.errors import UserInputError


class Fish(DGAlgorithm):
    """A copy of the network takes one step of the configured optimizer on each training
    domain in turn; the network then moves ``meta_lr`` of the way to the copy's weights.

    As DomainBed's ``Fish``: the copy starts from the network's weights at every step, its
    optimizer (DomainBed's inner Adam; here the configured optimizer, built by
    :func:`~genie_dg.algorithms.base.build_inner_optimizer`) keeps its state from step to step,
    and domains are visited in the order of the batch.

    The outer move is applied as a gradient so the configured optimizer makes the training
    step: each parameter ``theta`` gets the gradient ``meta_lr * (theta - theta_copy) / lr``,
    ``lr`` being its learning rate. Since the copy moved by ``lr`` times the inner update
    directions, this is ``meta_lr`` times their sum, on the scale of a gradient; plain SGD
    without momentum then reproduces DomainBed's ``theta + meta_lr * (theta_copy - theta)``
    exactly, other optimizers precondition it as they would a gradient. The outer optimizer
    has no weight decay: the inner steps already applied it (DomainBed has no outer optimizer).
    Buffers (batch-norm running statistics) are not optimized: floating-point ones move
    ``meta_lr`` of the way to the copy's, as DomainBed interpolates its whole ``state_dict``,
    integer ones (batch counters) take the copy's value.

    Deviations: the reported loss is the mean of the inner losses (DomainBed reports the last
    domain's); the inner optimizer's state is part of the checkpoint (``_extra_state``), so a
    resumed run continues it (DomainBed keeps it in memory only). Optimizers that differentiate
    the gradient (AdaHessian, GAM) are refused: the outer gradient is no loss's gradient. With a
    single training domain (``allow_degenerate=true``) the inner loop takes one step, which is
    ERM with a damped step.
    """

    min_domains = 2
    automatic_optimization = False

    def __init__(
        self, num_classes: int, num_domains: int, num_features: int, meta_lr: float = 0.5, **base: Any
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        self.meta_lr = hparam(meta_lr, "meta_lr", lambda v: 0 < v <= 1, "0 < meta_lr <= 1", "Fish")
        self._optimizer_factory: OptimizerFactory | None = None
        # Plain lists, so the copy and its optimizer are neither submodules (checkpointed
        # twice, seen by DDP) nor moved with the module; the optimizer's state is saved through
        # get_extra_state.
        self._inner: list[tuple[nn.Module, torch.optim.Optimizer]] = []
        self._pending_inner_state: dict[str, Any] | None = None

    def configure_optimizers(self, network: nn.Module, optimizer: OptimizerFactory) -> torch.optim.Optimizer:
        self._optimizer_factory = optimizer
        outer = optimizer([p for p in network.parameters() if p.requires_grad], weight_decay=0.0)
        refuse_second_order("Fish", outer)
        if any(group["lr"] <= 0 for group in outer.param_groups):
            raise UserInputError("Fish scales its outer update by 1 / optimizer.lr: set optimizer.lr > 0")
        return outer

    def _inner_loop(self, network: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
        if not self._inner:
            inner = copy.deepcopy(network)
            inner_optimizer = build_inner_optimizer(
                self._optimizer_factory, [p for p in inner.parameters() if p.requires_grad]
            )
            if self._pending_inner_state is not None:
                inner_optimizer.load_state_dict(self._pending_inner_state)
                self._pending_inner_state = None
            self._inner.append((inner, inner_optimizer))
        return self._inner[0]

    def get_extra_state(self) -> dict[str, Any]:
        if self._inner:
            return {"inner_optimizer": self._inner[0][1].state_dict()}
        return {"inner_optimizer": self._pending_inner_state}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("inner_optimizer")
        if self._inner and saved is not None:
            self._inner[0][1].load_state_dict(saved)
        else:
            self._pending_inner_state = saved

    def manual_step(self, step: StepContext, batches: list[DomainBatch]) -> AlgorithmOutput:
        optimizer = step.optimizer
        network = step.network
        inner, inner_optimizer = self._inner_loop(network)
        inner.load_state_dict(network.state_dict())
        losses = []
        for batch in batches:
            loss = F.cross_entropy(inner(batch.x), batch.y)
            inner_optimizer.zero_grad()
            loss.backward()
            inner_optimizer.step()
            losses.append(loss.detach())

        inner_of = {id(p): q for p, q in zip(network.parameters(), inner.parameters())}
        surrogate = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                direction = (p.detach() - inner_of[id(p)].detach()) * (self.meta_lr / group["lr"])
                surrogate.append((p * direction).sum())
        optimizer.zero_grad()
        # Back-propagated, not assigned, so loss scaling and DDP's gradient averaging apply.
        step.backward(torch.stack(surrogate).sum())
        optimizer.step()
        with torch.no_grad():
            for buffer, inner_buffer in zip(network.buffers(), inner.buffers()):
                if buffer.is_floating_point():
                    buffer.lerp_(inner_buffer, self.meta_lr)
                else:
                    buffer.copy_(inner_buffer)
        return AlgorithmOutput(torch.stack(losses).mean())
