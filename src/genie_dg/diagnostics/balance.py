"""How evenly an optimizer spreads its updates over the layers (paper Fig. 1)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def gini(values: Tensor) -> float:
    """Gini coefficient of non-negative ``values``: 0 when all are equal, (n-1)/n for one-hot.

    ``G = sum_i sum_j |x_i - x_j| / (2 n sum x)``, computed from the sorted values as
    ``2 sum_i i x_(i) / (n sum x) - (n + 1) / n`` (i = 1..n). 0 for an all-zero vector.
    """
    x = values.detach().flatten().to(torch.float64).sort().values
    n = x.numel()
    total = float(x.sum())
    if n == 0 or total == 0.0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(2.0 * (ranks * x).sum() / (n * total) - (n + 1) / n)


def rms_change(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> Tensor:
    """Root-mean-square change per tensor, ``||a - b|| / sqrt(numel)``, in ``before``'s order.

    Dividing by the size makes a large and a small layer that move every coordinate by the
    same amount equally large.
    """
    return torch.stack(
        [torch.linalg.vector_norm((after[name] - b).to(torch.float64)) / b.numel() ** 0.5 for name, b in before.items()]
    ).cpu()


def mean_absolute_change(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> Tensor:
    """Mean over coordinates of ``|a - b|`` per tensor, in ``before``'s order."""
    return torch.stack([(after[name] - b).abs().to(torch.float64).mean() for name, b in before.items()]).cpu()


def max_normalised(columns: Tensor) -> Tensor:
    """Each column divided by its largest entry (all-zero columns stay zero)."""
    peak = columns.amax(dim=0, keepdim=True)
    return torch.where(peak > 0, columns / peak.clamp_min(torch.finfo(columns.dtype).tiny), 0.0)


def min_max_normalised(columns: Tensor) -> Tensor:
    """Each column mapped linearly onto [0, 1] (constant columns become zero)."""
    low = columns.amin(dim=0, keepdim=True)
    span = columns.amax(dim=0, keepdim=True) - low
    return torch.where(span > 0, (columns - low) / span.clamp_min(torch.finfo(columns.dtype).tiny), 0.0)
