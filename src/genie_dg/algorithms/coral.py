"""Deep CORAL (Sun & Saenko, 2016) as DomainBed defines it."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import AlgorithmOutput, DGAlgorithm, DomainBatch, hparam


def coral_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the feature means plus that of the covariances."""
    mean_a, mean_b = a.mean(0, keepdim=True), b.mean(0, keepdim=True)
    cent_a, cent_b = a - mean_a, b - mean_b
    cov_a = cent_a.t() @ cent_a / (len(a) - 1)
    cov_b = cent_b.t() @ cent_b / (len(b) - 1)
    return (mean_a - mean_b).pow(2).mean() + (cov_a - cov_b).pow(2).mean()


class CORAL(DGAlgorithm):
    """Cross-entropy plus ``mmd_gamma`` times the CORAL distance averaged over domain pairs.

    Each domain's features are computed in its own forward pass, as in DomainBed, so batch
    normalisation sees one domain at a time.
    """

    min_domains = 2

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        mmd_gamma: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        self.mmd_gamma = hparam(mmd_gamma, "mmd_gamma", lambda v: v >= 0, "mmd_gamma >= 0", "CORAL")

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        features = [network.features(b.x) for b in batches]
        classification = torch.stack(
            [F.cross_entropy(network.head(f), b.y) for f, b in zip(features, batches)]
        ).mean()
        pairs = list(itertools.combinations(features, 2))
        penalty = (
            torch.stack([coral_distance(a, b) for a, b in pairs]).mean()
            if pairs
            else classification.new_zeros(())
        )
        return AlgorithmOutput(
            classification + self.mmd_gamma * penalty,
            {"classification_loss": classification.detach(), "coral_penalty": penalty.detach()},
        )
