"""Inter-domain Mixup (Xu et al., 2020, "Adversarial Domain Adaptation with Domain Mixup";
Yan et al., 2020, "Improve Unsupervised Domain Adaptation with Mixup Training") as DomainBed
defines it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import AlgorithmOutput, DGAlgorithm, DomainBatch, hparam


def domain_cycle(permutation: list[int]) -> list[tuple[int, int]]:
    """Pairs each domain of ``permutation`` with the next one, the last with the first
    (DomainBed's ``random_pairs_of_minibatches``)."""
    return [(i, permutation[(k + 1) % len(permutation)]) for k, i in enumerate(permutation)]


class Mixup(DGAlgorithm):
    """Cross-entropy on convex combinations of two domains' minibatches.

    As DomainBed's ``Mixup``: the domains are shuffled into a cycle; each domain ``i`` is mixed
    with the next domain ``j`` (both truncated to the shorter length) with
    ``lam ~ Beta(mixup_alpha, mixup_alpha)`` drawn per pair, and the loss is
    ``lam * CE(f(x_mix), y_i) + (1 - lam) * CE(f(x_mix), y_j)`` summed over the pairs and divided
    by the number of domains. Each mixed batch has its own forward pass. The cycle and the
    ``lam`` are drawn once per training step, from torch's generator (DomainBed: numpy's), so an
    optimizer that evaluates the loss twice (SAM) sees the same objective both times. With a single domain the one pair mixes the
    minibatch with itself, which is ERM.
    """

    min_domains = 2

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        mixup_alpha: float = 0.2,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        self.mixup_alpha = hparam(mixup_alpha, "mixup_alpha", lambda v: v > 0, "mixup_alpha > 0", "Mixup")
        self._draw_step: int | None = None
        self._draw: list[tuple[int, int, float]] = []

    def mixing_plan(self, num_batches: int) -> list[tuple[int, int, float]]:
        """This step's ``(i, j, lam)`` triples: drawn at its first call in a step, then reused."""
        step = int(self.update_count)
        if self._draw_step != step or len(self._draw) != num_batches:
            pairs = domain_cycle(torch.randperm(num_batches).tolist())
            beta = torch.distributions.Beta(float(self.mixup_alpha), float(self.mixup_alpha))
            self._draw = [(i, j, float(beta.sample())) for i, j in pairs]
            self._draw_step = step
        return self._draw

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        total = 0.0
        for i, j, lam in self.mixing_plan(len(batches)):
            n = min(len(batches[i].y), len(batches[j].y))
            x = lam * batches[i].x[:n] + (1 - lam) * batches[j].x[:n]
            logits = network(x)
            total = total + lam * F.cross_entropy(logits, batches[i].y[:n])
            total = total + (1 - lam) * F.cross_entropy(logits, batches[j].y[:n])
        return AlgorithmOutput(total / len(batches))
