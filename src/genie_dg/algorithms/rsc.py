"""Representation Self-Challenging (Huang et al., 2020) as DomainBed defines it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import AlgorithmOutput, DGAlgorithm, DomainBatch, hparam, pooled


def rsc_keep_mask(
    head: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    feature_drop_factor: float,
    batch_drop_factor: float,
) -> torch.Tensor:
    """The 0/1 mask RSC multiplies the features with (1 keeps an activation).

    Per sample, the features whose gradient of the true-class logit is at or above the
    ``1 - feature_drop_factor`` quantile of that sample's gradients are muted (RSC's
    equations 1-3). Only the samples whose true-class probability drops the most when muted,
    those at or above the ``1 - batch_drop_factor`` quantile of the drops (section 3.3, the
    batch percentage), keep that muting; the others keep all their features.

    Quantiles interpolate linearly, as ``np.percentile`` in DomainBed. The mask carries no
    gradient.
    """
    with torch.enable_grad():
        probe = features.detach().requires_grad_()
        logits = head(probe)
        one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        (gradients,) = torch.autograd.grad((logits * one_hot).sum(), probe)
    with torch.no_grad():
        # torch.quantile needs float32/float64, whatever precision the run uses.
        gradients = gradients.float()
        threshold = torch.quantile(gradients, 1.0 - feature_drop_factor, dim=1, keepdim=True)
        feature_keep = gradients < threshold
        muted_logits = head(probe.detach() * feature_keep.to(probe.dtype))
        true_probability = (F.softmax(logits.detach().float(), dim=1) * one_hot).sum(1)
        muted_true_probability = (F.softmax(muted_logits.float(), dim=1) * one_hot).sum(1)
        changes = true_probability - muted_true_probability
        sample_keep = changes < torch.quantile(changes, 1.0 - batch_drop_factor)
        return (feature_keep | sample_keep[:, None]).to(features.dtype)


class RSC(DGAlgorithm):
    """Representation Self-Challenging (Huang, Wang, Xing & Huang, ECCV 2020), as DomainBed.

    Cross-entropy of the head applied to the pooled minibatch's features after muting, for
    the ``rsc_b_drop_factor`` fraction of samples whose prediction depends on them most, the
    ``rsc_f_drop_factor`` fraction of feature dimensions with the largest gradient of the
    true-class logit (see :func:`rsc_keep_mask`). Evaluation uses the unmuted network.

    Follows DomainBed: the gradient is the signed one (not its magnitude), the percentiles
    interpolate linearly, and the mask is recomputed from the current weights at every
    evaluation (a closure-based optimizer re-evaluating the loss gets a fresh mask); RSC has
    no state of its own.
    """

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        rsc_f_drop_factor: float = 1 / 3,
        rsc_b_drop_factor: float = 1 / 3,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)

        def in_unit_interval(value: float) -> bool:
            return 0.0 <= value <= 1.0

        self.rsc_f_drop_factor = hparam(
            rsc_f_drop_factor, "rsc_f_drop_factor", in_unit_interval, "0 <= rsc_f_drop_factor <= 1", "RSC"
        )
        self.rsc_b_drop_factor = hparam(
            rsc_b_drop_factor, "rsc_b_drop_factor", in_unit_interval, "0 <= rsc_b_drop_factor <= 1", "RSC"
        )

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        x, y = pooled(batches)
        features = network.features(x)
        keep = rsc_keep_mask(network.head, features, y, self.rsc_f_drop_factor, self.rsc_b_drop_factor)
        loss = F.cross_entropy(network.head(features * keep), y)
        return AlgorithmOutput(loss, {"muted_fraction": 1.0 - keep.mean()})
