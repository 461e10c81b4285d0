"""Marginal Transfer Learning (Blanchard et al., 2021) as DomainBed defines it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import AlgorithmOutput, DGAlgorithm, DomainBatch, hparam


class MarginalTransferHead(nn.Module):
    """A linear classifier of a sample's features concatenated with its domain's embedding.

    Without an explicit ``embedding`` the domain is the batch itself: its mean feature vector
    embeds it, so at evaluation each test batch is classified with its own marginal.
    """

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * num_features, num_classes)

    def forward(self, features: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        if embedding is None:
            embedding = features.mean(0)
        return self.linear(torch.cat([features, embedding.expand_as(features)], dim=1))


class MTL(DGAlgorithm):
    """Marginal Transfer Learning (Blanchard, Deshmukh, Dogan, Lee & Scott, JMLR 2021), as
    DomainBed's neural version.

    :meth:`setup_network` replaces the network's head by a :class:`MarginalTransferHead`
    that sees ``[features, domain embedding]``. During training, the embedding of the i-th
    training domain of the step is ``mtl_ema * batch mean + (1 - mtl_ema) * stored``, where
    ``stored`` (the ``embeddings`` buffer, checkpointed) is the previous step's embedding of
    that domain; gradients flow through the batch mean only. The loss is the *sum* over
    domains of each domain's cross-entropy, as in DomainBed. At evaluation the embedding is the
    mean feature vector of the test batch (DomainBed's ``predict`` without an environment),
    so ``network(x)`` is the MTL prediction.

    Deviation from DomainBed: DomainBed's ``predict`` calls ``.normal_()`` on the embedding,
    which overwrites it in place with standard normal noise (facebookresearch/DomainBed
    issue #159), so its classifier never sees the marginal. Here the embedding is the mean
    features, as the paper defines it. The stored embeddings are updated once per training
    step (a closure-based optimizer re-evaluating the loss reuses the step's starting
    embeddings); domains are indexed by their position in the step's batches, as DomainBed's
    environment index.
    """

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        mtl_ema: float = 0.99,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        self.mtl_ema = hparam(mtl_ema, "mtl_ema", lambda v: 0.0 <= v <= 1.0, "0 <= mtl_ema <= 1", "MTL")
        self.register_buffer("embeddings", torch.zeros(num_domains, num_features))
        self._embeddings_at_step_start = self.embeddings.clone()
        self._embeddings_updated_at = -1

    def setup_network(self, network: nn.Module) -> None:
        network.head = MarginalTransferHead(network.num_features, self.num_classes)

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        step = int(self.update_count)
        first_evaluation = step != self._embeddings_updated_at
        if first_evaluation:
            self._embeddings_at_step_start = self.embeddings.clone()
            self._embeddings_updated_at = step
        losses = []
        for index, batch in enumerate(batches):
            features = network.features(batch.x)
            embedding = self.mtl_ema * features.mean(0) + (1.0 - self.mtl_ema) * self._embeddings_at_step_start[index]
            if first_evaluation:
                self.embeddings[index] = embedding.detach()
            losses.append(F.cross_entropy(network.head(features, embedding), batch.y))
        return AlgorithmOutput(torch.stack(losses).sum())
