"""Group DRO (Sagawa et al., 2020, "Distributionally Robust Neural Networks for Group Shifts",
Algorithm 1) with the training domains as groups, as DomainBed defines it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import AlgorithmOutput, DGAlgorithm, DomainBatch, hparam, replica_mean


class GroupDRO(DGAlgorithm):
    """Minimises ``q . risks``, where the domain weights ``q`` climb the risks by exponentiated
    gradient: ``q <- q * exp(groupdro_eta * risk)``, then renormalised.

    As DomainBed's ``GroupDRO``: each domain's risk comes from its own forward pass, ``q``
    starts uniform, and the step's loss uses the weights already updated with this step's
    (detached) risks. ``q`` is a buffer, so it is checkpointed, and it is updated once per
    training step even when a closure-based optimizer evaluates the loss twice. Under DDP the
    risks that update ``q`` are averaged over the replicas first, so every replica keeps the
    same ``q`` (that of the whole batch, as on one device). With a single
    domain (``allow_degenerate=true``) ``q = [1]``, which is ERM.
    """

    min_domains = 2

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        groupdro_eta: float = 1e-2,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        self.groupdro_eta = hparam(groupdro_eta, "groupdro_eta", lambda v: v >= 0, "groupdro_eta >= 0", "GroupDRO")
        self.register_buffer("q", torch.full((num_domains,), 1.0 / num_domains))
        self._q_updated_at_step: int | None = None

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        if len(batches) != self.num_domains:
            raise ValueError(
                f"GroupDRO keeps one weight per training domain ({self.num_domains}) but got {len(batches)} minibatches"
            )
        risks = torch.stack([F.cross_entropy(network(b.x), b.y) for b in batches])
        step = int(self.update_count)
        if self._q_updated_at_step != step:
            self._q_updated_at_step = step
            weights = self.q * torch.exp(self.groupdro_eta * replica_mean(risks.detach()))
            self.q.copy_(weights / weights.sum())
        loss = torch.dot(risks, self.q)
        metrics = {"classification_loss": risks.mean().detach(), "worst_domain_loss": risks.max().detach()}
        metrics.update({f"groupdro_q_domain{b.domain}": w for b, w in zip(batches, self.q.detach().clone())})
        return AlgorithmOutput(loss, metrics)
