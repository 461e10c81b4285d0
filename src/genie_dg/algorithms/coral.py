"""Deep CORAL (Sun & Saenko, 2016) as DomainBed defines it."""

from __future__ import annotations

import torch

from genie_dg.algorithms.base import FeatureMatching


def coral_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the feature means plus that of the covariances."""
    mean_a, mean_b = a.mean(0, keepdim=True), b.mean(0, keepdim=True)
    cent_a, cent_b = a - mean_a, b - mean_b
    cov_a = cent_a.t() @ cent_a / (len(a) - 1)
    cov_b = cent_b.t() @ cent_b / (len(b) - 1)
    return (mean_a - mean_b).pow(2).mean() + (cov_a - cov_b).pow(2).mean()


class CORAL(FeatureMatching):
    """Cross-entropy plus ``mmd_gamma`` times the CORAL distance averaged over domain pairs
    (see :class:`~genie_dg.algorithms.base.FeatureMatching`)."""

    penalty_name = "coral_penalty"
    distance = staticmethod(coral_distance)
