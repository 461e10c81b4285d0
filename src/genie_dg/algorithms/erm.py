"""Empirical risk minimisation: cross-entropy on the pooled minibatches."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import AlgorithmOutput, DGAlgorithm, DomainBatch, pooled


class ERM(DGAlgorithm):
    """Cross-entropy over all training domains' samples at once (DomainBed's ERM)."""

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        x, y = pooled(batches)
        return AlgorithmOutput(F.cross_entropy(network(x), y))
