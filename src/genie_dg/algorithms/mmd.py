"""MMD (Li et al., 2018, "Domain Generalization with Adversarial Feature Learning") as DomainBed
defines it: a Gaussian-kernel MMD between every pair of training domains' features."""

from __future__ import annotations

import torch

from genie_dg.algorithms.base import FeatureMatching

# DomainBed's kernel: a sum of RBF kernels exp(-gamma * ||a - b||^2) over these gammas, so no
# single bandwidth has to suit the feature scale.
KERNEL_GAMMAS = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise ``||a_i - b_j||^2`` by the norm expansion, floored at 1e-30 as in DomainBed
    (round-off can make it slightly negative, and the floor keeps its gradient finite)."""
    a_norm = a.pow(2).sum(-1, keepdim=True)
    b_norm = b.pow(2).sum(-1, keepdim=True)
    return (a_norm + b_norm.t() - 2 * a @ b.t()).clamp_min(1e-30)


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The multi-bandwidth kernel matrix ``sum_gamma exp(-gamma * ||a_i - b_j||^2)``."""
    distances = squared_distances(a, b)
    return sum(torch.exp(-gamma * distances) for gamma in KERNEL_GAMMAS)


def gaussian_mmd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The biased estimate of the squared MMD: ``mean K(a,a) + mean K(b,b) - 2 mean K(a,b)``.

    Computed in at least float32 with autocast off: the norm expansion of the distances
    cancels catastrophically in half precision, which would swamp the penalty.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.to(dtype), b.to(dtype)
        return gaussian_kernel(a, a).mean() + gaussian_kernel(b, b).mean() - 2 * gaussian_kernel(a, b).mean()


class MMD(FeatureMatching):
    """Cross-entropy plus ``mmd_gamma`` times the Gaussian-kernel MMD averaged over domain pairs.

    Follows DomainBed's ``MMD`` (``AbstractMMD`` with ``gaussian=True``, here
    :class:`~genie_dg.algorithms.base.FeatureMatching`): the classification loss is the mean of
    the per-domain cross-entropies, the kernel sums the RBF kernels of ``KERNEL_GAMMAS``, and
    each domain's features come from its own forward pass, so batch normalisation sees one
    domain at a time.
    """

    penalty_name = "mmd_penalty"
    distance = staticmethod(gaussian_mmd)
