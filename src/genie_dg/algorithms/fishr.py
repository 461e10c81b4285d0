"""Fishr (Rame et al., 2022, "Fishr: Invariant Gradient Variances for Out-of-Distribution
Generalization") as DomainBed defines it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import AlgorithmOutput, AnnealedPenalty, DomainBatch, hparam, pooled, replica_mean


def head_gradients(features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients of the cross-entropy with respect to a linear head, flattened.

    For ``logits = features @ W.T + b`` the gradient of sample ``i``'s loss is
    ``r_i outer features_i`` for ``W`` and ``r_i`` for ``b``, with ``r_i = softmax(logits_i) -
    onehot(y_i)``; the closed form stays differentiable, so the penalty trains the featurizer
    as BackPACK's ``BatchGrad`` with ``create_graph=True`` does in DomainBed. Returns
    ``(n, C * D + C)``: the weight's gradient row-major, then the bias's.
    """
    # At least float32 under mixed precision: variances of small gradients underflow in half.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    features, logits = features.to(dtype), logits.to(dtype)
    residual = logits.softmax(-1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    weight = residual.unsqueeze(-1) * features.unsqueeze(-2)
    return torch.cat([weight.flatten(1), residual], dim=1)


def gradient_variance(gradients: torch.Tensor) -> torch.Tensor:
    """The (biased) variance over samples of each gradient coordinate."""
    return (gradients - gradients.mean(0, keepdim=True)).pow(2).mean(0)


def variance_distance(variances: torch.Tensor) -> torch.Tensor:
    """Fishr's penalty: the mean over domains of the mean squared distance between a domain's
    gradient variances (one row per domain) and their average over domains."""
    return (variances - variances.mean(0, keepdim=True)).pow(2).mean()


class Fishr(AnnealedPenalty):
    """Pooled cross-entropy plus ``fishr_lambda`` times the spread across domains of the
    classifier head's per-sample gradient variances.

    As DomainBed's ``Fishr``: one forward pass over all domains' samples; each domain's
    gradient variance is smoothed by an exponential moving average (``fishr_ema``, starting
    from zero, divided by ``1 - fishr_ema`` so the gradient scale does not depend on it); the
    penalty weight is 0 for the first ``fishr_penalty_anneal_iters`` steps and ``fishr_lambda``
    from then on. DomainBed also rebuilds its Adam optimizer at the switching step (unless it is
    step 0); ``reset_optimizer_on_anneal=True`` (the default) clears the optimizer's state there (see
    :class:`~genie_dg.algorithms.base.AnnealedPenalty`).

    Deviations: the per-sample head gradients are computed in closed form instead of with
    BackPACK (same values); DomainBed's hyper-parameters ``lambda``, ``penalty_anneal_iters``
    and ``ema`` are named ``fishr_lambda``, ``fishr_penalty_anneal_iters`` and ``fishr_ema``
    (``lambda`` is a Python keyword); the moving averages are a buffer (``variance_ema``,
    one row per domain), so they are checkpointed, and they advance once per training step
    even when a closure-based optimizer evaluates the loss twice; before annealing the penalty is
    computed without a graph (its weight is 0, so the gradients are unchanged). Under DDP each
    replica's variances come from its shard; they are averaged over the replicas before the moving
    average, so every replica keeps the same one (DDP would broadcast rank 0's). With a single
    domain (``allow_degenerate=true``) the penalty is 0, which is ERM.
    """

    weight_before_anneal = 0.0
    reset_at_step_zero = False

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        fishr_lambda: float = 1000.0,
        fishr_penalty_anneal_iters: int = 1500,
        fishr_ema: float = 0.95,
        reset_optimizer_on_anneal: bool = True,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, reset_optimizer_on_anneal, **base)
        self.fishr_lambda, self.fishr_penalty_anneal_iters = self.schedule_hparams(
            "fishr", fishr_lambda, fishr_penalty_anneal_iters
        )
        self.fishr_ema = hparam(fishr_ema, "fishr_ema", lambda v: 0 <= v < 1, "0 <= fishr_ema < 1", "Fishr")
        head_size = num_classes * num_features + num_classes
        self.register_buffer("variance_ema", torch.zeros(num_domains, head_size))
        # The averages before this step's update, reused when the loss is evaluated again.
        self._ema_step: int | None = None
        self._ema_before_step: torch.Tensor | None = None

    def _smoothed_variances(self, variances: torch.Tensor) -> torch.Tensor:
        step = int(self.update_count)
        if self._ema_step != step:
            self._ema_step = step
            self._ema_before_step = self.variance_ema.clone()
        smoothed = self.fishr_ema * self._ema_before_step + (1 - self.fishr_ema) * variances
        self.variance_ema.copy_(smoothed.detach())
        return smoothed / (1 - self.fishr_ema)

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        if len(batches) != self.num_domains:
            raise ValueError(
                f"Fishr keeps one moving average per training domain ({self.num_domains}) "
                f"but got {len(batches)} minibatches"
            )
        weight, reset = self.penalty_schedule(self.fishr_lambda, self.fishr_penalty_anneal_iters)
        x, y = pooled(batches)
        features = network.features(x)
        logits = network.head(features)
        classification = F.cross_entropy(logits, y)
        # Before annealing the penalty only feeds the moving averages: no graph through it.
        with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
            gradients = head_gradients(features, logits, y).split([len(b.y) for b in batches])
            variances = torch.stack([gradient_variance(g) for g in gradients])
            # Under DDP: the replicas' mean (so every replica's moving average stays the same), with
            # the gradient through this replica's own share; DDP averages those gradients.
            variances = replica_mean(variances) + (variances - variances.detach())
            penalty = variance_distance(self._smoothed_variances(variances))
        return AlgorithmOutput(
            classification + weight * penalty,
            {
                "classification_loss": classification.detach(),
                "fishr_penalty": penalty.detach(),
                "fishr_penalty_weight": classification.new_tensor(float(weight)),
            },
            reset_optimizer=reset,
        )
