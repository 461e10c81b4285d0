"""MLDG (Li et al., 2018, "Learning to Generalize: Meta-Learning for Domain Generalization"),
first-order, as DomainBed defines it."""

from __future__ import annotations

import copy
import itertools
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
    pooled,
    refuse_second_order,
)


def meta_train_test_pairs(batches: list[DomainBatch], n_meta_test: int) -> list[tuple[DomainBatch, DomainBatch]]:
    """DomainBed's ``split_meta_train_test``: a random permutation of the domains, the last
    ``n_meta_test`` are meta-test, each other domain is paired with one of them in turn; both
    minibatches of a pair are cut to the shorter one's length."""
    order = torch.randperm(len(batches)).tolist()
    meta_train, meta_test = order[: len(batches) - n_meta_test], order[-n_meta_test:]
    pairs = []
    for i, j in zip(meta_train, itertools.cycle(meta_test)):
        train, test = batches[i], batches[j]
        n = min(len(train.y), len(test.y))
        pairs.append(
            (
                DomainBatch(train.x[:n], train.y[:n], train.domain),
                DomainBatch(test.x[:n], test.y[:n], test.domain),
            )
        )
    return pairs


def copy_buffers(source: nn.Module, target: nn.Module) -> None:
    """Copy every buffer (batch-norm running statistics) of ``source`` into ``target``."""
    with torch.no_grad():
        for from_buffer, to_buffer in zip(source.buffers(), target.buffers()):
            to_buffer.copy_(from_buffer)


class MLDG(DGAlgorithm):
    """First-order MLDG: per meta-train/meta-test pair ``(i, j)``, a copy of the network takes
    one step of the configured optimizer on domain ``i``'s loss ``L_i`` (gradient ``G_i``); the
    gradient ``G_j`` of domain ``j``'s loss is taken at the copy's new weights. The network's
    optimizer then makes one step with the gradient ``sum over pairs (G_i + mldg_beta * G_j) /
    number of domains``.

    As DomainBed's ``MLDG`` (first order: no second derivatives): the pairs come from
    ``split_meta_train_test`` with ``n_meta_test`` meta-test domains; each pair starts from a fresh
    copy and a fresh inner optimizer (DomainBed builds a new Adam; here the configured
    optimizer, see :func:`build_inner_optimizer`). The reported loss is DomainBed's objective,
    ``sum over pairs (L_i + mldg_beta * L_j) / number of domains``.

    Deviations: the copy is made once and reloaded with the network's weights for each pair
    (the same as a fresh deep copy); the composed gradient is applied by back-propagating
    ``sum(parameter * gradient)``, so mixed-precision loss scaling and DistributedDataParallel's
    gradient averaging apply to it; DomainBed runs its forward passes on the copies only, so
    the network's batch-norm running statistics never move (moot where they are frozen, as in
    DomainBed's ResNet at commit 6b21583 or with ``backbone.freeze_bn=true`` here, and for
    group norm, DomainBed's MNIST network), while here the statistics the copy gathers are
    copied back after each pair. ``n_meta_test`` must leave at least one
    meta-train domain (DomainBed silently trains on nothing then). Optimizers that differentiate
    the gradient (AdaHessian, GAM) are refused: the composed gradient is no loss's gradient.
    With a single training domain (``allow_degenerate=true``) a step is ERM's.
    """

    min_domains = 2
    automatic_optimization = False

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        mldg_beta: float = 1.0,
        n_meta_test: int = 2,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        self.mldg_beta = hparam(mldg_beta, "mldg_beta", lambda v: v >= 0, "mldg_beta >= 0", "MLDG")
        most = max(num_domains - 1, 1)
        self.n_meta_test = hparam(
            n_meta_test,
            "n_meta_test",
            lambda v: isinstance(v, int) and not isinstance(v, bool) and (1 <= v <= most or not self.penalty_active),
            f"an integer in [1, {most}]: at least one of the {num_domains} training domains must be meta-train",
            "MLDG",
        )
        self._optimizer_factory: OptimizerFactory | None = None
        # A plain list, so the copy is neither a submodule (checkpointed, seen by DDP) nor moved.
        self._copy: list[nn.Module] = []

    def configure_optimizers(self, network: nn.Module, optimizer: OptimizerFactory) -> torch.optim.Optimizer:
        self._optimizer_factory = optimizer
        outer = super().configure_optimizers(network, optimizer)
        refuse_second_order("MLDG", outer)
        return outer

    def _network_copy(self, network: nn.Module) -> nn.Module:
        if not self._copy:
            self._copy.append(copy.deepcopy(network))
        return self._copy[0]

    def manual_step(self, step: StepContext, batches: list[DomainBatch]) -> AlgorithmOutput:
        optimizer = step.optimizer
        network = step.network
        optimizer.zero_grad()
        if not self.penalty_active:
            x, y = pooled(batches)
            loss = F.cross_entropy(network(x), y)
            step.backward(loss)
            optimizer.step()
            return AlgorithmOutput(loss.detach())

        params = [p for p in network.parameters() if p.requires_grad]
        inner = self._network_copy(network)
        inner_params = [p for p in inner.parameters() if p.requires_grad]
        gradient = [torch.zeros_like(p) for p in params]
        meta_train_losses, meta_test_losses = [], []
        for train, test in meta_train_test_pairs(batches, self.n_meta_test):
            inner.load_state_dict(network.state_dict())
            meta_train_loss = F.cross_entropy(inner(train.x), train.y)
            grads_train = torch.autograd.grad(meta_train_loss, inner_params, allow_unused=True)
            for p, g in zip(inner_params, grads_train):
                p.grad = g
            build_inner_optimizer(self._optimizer_factory, inner_params).step()
            meta_test_loss = F.cross_entropy(inner(test.x), test.y)
            grads_test = torch.autograd.grad(meta_test_loss, inner_params, allow_unused=True)
            for total, g_train, g_test in zip(gradient, grads_train, grads_test):
                if g_train is not None:
                    total.add_(g_train, alpha=1 / len(batches))
                if g_test is not None:
                    total.add_(g_test, alpha=self.mldg_beta / len(batches))
            copy_buffers(inner, network)
            meta_train_losses.append(meta_train_loss.detach())
            meta_test_losses.append(meta_test_loss.detach())

        step.backward(sum((p * g).sum() for p, g in zip(params, gradient)))
        optimizer.step()
        meta_train = torch.stack(meta_train_losses)
        meta_test = torch.stack(meta_test_losses)
        objective = (meta_train.sum() + self.mldg_beta * meta_test.sum()) / len(batches)
        return AlgorithmOutput(objective, {"meta_train_loss": meta_train.mean(), "meta_test_loss": meta_test.mean()})
