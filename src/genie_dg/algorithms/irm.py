"""IRMv1 (Arjovsky et al., 2019, "Invariant Risk Minimization") as DomainBed defines it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import AlgorithmOutput, AnnealedPenalty, DomainBatch
from genie_dg.errors import UserInputError


def scale_gradient(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d/ds cross_entropy(s * logits, y)`` at ``s = 1``, in closed form and differentiable.

    The derivative of ``logsumexp(s * z) - s * z_y`` in ``s`` is ``softmax(z) . z - z_y``;
    DomainBed obtains the same number by autograd through a dummy scale. Computed in at least
    float32, as the penalty is a small difference of large terms.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    expected_logit = (logits.softmax(-1) * logits).sum(-1)
    true_logit = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (expected_logit - true_logit).mean()


def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """IRMv1's squared gradient norm for one domain, unbiased as in DomainBed: the product of
    the scale gradients of the even- and the odd-indexed samples."""
    return scale_gradient(logits[::2], y[::2]) * scale_gradient(logits[1::2], y[1::2])


class IRM(AnnealedPenalty):
    """Mean per-domain cross-entropy plus a weight times the mean IRMv1 penalty.

    As DomainBed's ``IRM``: one forward pass over all domains' samples; the penalty weight is
    1 for the first ``irm_penalty_anneal_iters`` steps and ``irm_lambda`` from then on, and
    ``reset_optimizer_on_anneal=True`` (the default) clears the optimizer's state at the
    switching step as DomainBed rebuilds its Adam there (see
    :class:`~genie_dg.algorithms.base.AnnealedPenalty`).
    With a single training domain (``allow_degenerate=true``) the penalty weight is 0, which is
    ERM.
    """

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        irm_lambda: float = 100.0,
        irm_penalty_anneal_iters: int = 500,
        reset_optimizer_on_anneal: bool = True,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, reset_optimizer_on_anneal, **base)
        self.irm_lambda, self.irm_penalty_anneal_iters = self.schedule_hparams(
            "irm", irm_lambda, irm_penalty_anneal_iters
        )

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        if min(len(b.y) for b in batches) < 2:
            raise UserInputError(
                "IRM splits each domain's minibatch into two halves for its penalty: "
                "set dataset.batch_size to 2 or more"
            )
        logits = network(torch.cat([b.x for b in batches])).split([len(b.y) for b in batches])
        classification = torch.stack([F.cross_entropy(z, b.y) for z, b in zip(logits, batches)]).mean()
        penalty = torch.stack([irm_penalty(z, b.y) for z, b in zip(logits, batches)]).mean()
        weight, reset = self.penalty_schedule(self.irm_lambda, self.irm_penalty_anneal_iters)
        if not self.penalty_active:
            # With one domain the penalty would only tune the classifier's scale on it.
            weight = 0.0
        return AlgorithmOutput(
            classification + weight * penalty,
            {
                "classification_loss": classification.detach(),
                "irm_penalty": penalty.detach(),
                "irm_penalty_weight": classification.new_tensor(float(weight)),
            },
            reset_optimizer=reset,
        )
