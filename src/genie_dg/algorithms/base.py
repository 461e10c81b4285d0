"""The seam between the LightningModule and a DG method."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from genie_dg.errors import UserInputError


@dataclass
class DomainBatch:
    """One training domain's minibatch of a step."""

    x: torch.Tensor
    y: torch.Tensor
    domain: int


@dataclass
class AlgorithmOutput:
    """The loss to minimise and named scalars to log under ``train/``."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class DGAlgorithm(nn.Module):
    """Base of every DG method: turns one step's per-domain minibatches into a loss.

    A method implements :meth:`training_loss`; extra networks it needs are submodules, so they
    are checkpointed and optimized with the classifier. ``min_domains`` is the number of
    training domains its penalty needs; with fewer, construction fails unless
    ``allow_degenerate=True``, which only warns that the penalty is inactive.
    """

    min_domains: ClassVar[int] = 1

    def __init__(
        self, num_classes: int, num_domains: int, num_features: int, allow_degenerate: bool = False
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if num_domains < self.min_domains:
            message = (
                f"{name} needs at least {self.min_domains} training domains for its penalty but "
                f"got {num_domains}"
            )
            if not allow_degenerate:
                raise UserInputError(
                    f"{message}; train on more domains, use algorithm=erm, or set "
                    "algorithm.allow_degenerate=true to run with the penalty inactive"
                )
            warnings.warn(f"{message}; the penalty is inactive (allow_degenerate=true)", stacklevel=2)
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.num_features = num_features

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        raise NotImplementedError
