"""V-REx (Krueger et al., 2021, "Out-of-Distribution Generalization via Risk Extrapolation")
as DomainBed defines it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import AlgorithmOutput, AnnealedPenalty, DomainBatch


def risk_variance(risks: torch.Tensor) -> torch.Tensor:
    """The (biased) variance of the per-domain risks, V-REx's penalty."""
    return (risks - risks.mean()).pow(2).mean()


class VREx(AnnealedPenalty):
    """Mean per-domain cross-entropy plus a weight times the variance of those risks.

    As DomainBed's ``VREx``: one forward pass over all domains' samples; the penalty weight is
    1 for the first ``vrex_penalty_anneal_iters`` steps and ``vrex_lambda`` from then on.
    DomainBed also rebuilds its Adam optimizer at the switching step (as for IRM);
    ``reset_optimizer_on_anneal=True`` (the default) does the same here by clearing the
    optimizer's state at that step (see :class:`~genie_dg.algorithms.base.AnnealedPenalty`).
    """

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        vrex_lambda: float = 10.0,
        vrex_penalty_anneal_iters: int = 500,
        reset_optimizer_on_anneal: bool = True,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, reset_optimizer_on_anneal, **base)
        self.vrex_lambda, self.vrex_penalty_anneal_iters = self.schedule_hparams(
            "vrex", vrex_lambda, vrex_penalty_anneal_iters
        )

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        logits = network(torch.cat([b.x for b in batches])).split([len(b.y) for b in batches])
        risks = torch.stack([F.cross_entropy(z, b.y) for z, b in zip(logits, batches)])
        mean_risk, penalty = risks.mean(), risk_variance(risks)
        weight, reset = self.penalty_schedule(self.vrex_lambda, self.vrex_penalty_anneal_iters)
        return AlgorithmOutput(
            mean_risk + weight * penalty,
            {
                "classification_loss": mean_risk.detach(),
                "vrex_penalty": penalty.detach(),
                "vrex_penalty_weight": mean_risk.new_tensor(float(weight)),
            },
            reset_optimizer=reset,
        )
