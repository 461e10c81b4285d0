"""MIRO, Mutual-Information Regularization with Oracle (Cha et al., ECCV 2022)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import (
    AlgorithmOutput,
    DGAlgorithm,
    DomainBatch,
    OptimizerFactory,
    hparam,
    pooled,
)
from genie_dg.models.timm_resnet import captured_outputs, first_conv_in_channels, stem_and_stages


class VarianceEncoder(nn.Module):
    """MIRO's variance encoder: one learned variance per channel, independent of the input.

    The variance is ``softplus(raw_variance) + eps``, starting at ``init``.
    """

    def __init__(self, channels: int, init: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        start = math.log(math.expm1(init - eps))
        self.raw_variance = nn.Parameter(torch.full((1, channels, 1, 1), start))

    def forward(self) -> torch.Tensor:
        return F.softplus(self.raw_variance) + self.eps


@contextmanager
def batch_norm_modes_of(oracle: nn.Module, reference: nn.Module | None) -> Iterator[None]:
    """Run ``oracle`` in evaluation mode, except that each batch-norm layer normalises as the
    layer of the same name in ``reference`` does now: with the batch's statistics where that
    layer is in training mode, with the stored ones where it is in evaluation mode (all of them
    with ``reference=None``). The
    oracle's running statistics (and batch counters) are never updated; every module's mode is
    restored on exit, so the oracle keeps the training flags Lightning gives it (Lightning warns
    about modules left in evaluation mode at the start of training).
    """
    modes = [(m, m.training) for m in oracle.modules()]
    reference_modules = dict(reference.named_modules()) if reference is not None else {}
    batch_statistics = [
        m
        for name, m in oracle.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and getattr(reference_modules.get(name), "training", False)
    ]
    tracking = [m.track_running_stats for m in batch_statistics]
    oracle.eval()
    for m in batch_statistics:
        # Training mode without tracking: normalise by the batch, leave the buffers alone.
        m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, track in zip(batch_statistics, tracking):
            m.track_running_stats = track
        for m, mode in modes:
            m.training = mode


def miro_penalty(
    features: list[torch.Tensor], oracle_features: list[torch.Tensor], variances: list[torch.Tensor]
) -> torch.Tensor:
    """Sum over layers of half the mean Gaussian negative log-likelihood (without its constant)
    of the oracle's features given the network's: ``((f - f0)^2 / var + log var) / 2``.

    The mean encoder is the identity, as in MIRO's code.
    """
    terms = [
        ((f - f0).pow(2) / var + var.log()).mean() / 2
        for f, f0, var in zip(features, oracle_features, variances, strict=True)
    ]
    return torch.stack(terms).sum()


class MIRO(DGAlgorithm):
    """Cross-entropy plus ``miro_lambda`` times MIRO's mutual-information lower bound penalty.

    Cha et al., "Domain Generalization by Mutual-Information Regularization with Pre-trained
    Models", ECCV 2022, following the authors' DomainBed code (khanrc/miro): the regularised
    features are the outputs of the ResNet stem (after max-pooling) and of its four residual
    stages (``feat_layers=stem_block``); the oracle is a frozen copy of the featurizer taken in
    :meth:`setup_network`, i.e. the pretrained (or initial) weights; the mean encoders are
    identities and the variance encoders learn one variance per channel (initial 0.1) with
    ``miro_lr_mult`` times the optimizer's learning rate.

    Batch normalisation: in khanrc/miro (commit 147fa57) both the trained featurizer and the
    oracle are ``URResNet`` modules, whose batch-norm layers are always in evaluation mode. Here the
    oracle normalises each layer as the trained featurizer's layer of the same name does at
    that step (:func:`batch_norm_modes_of`), so with identical weights the two feature sets are
    identical and the penalty is at its minimum. With ``backbone.freeze_bn=true`` both use the
    stored statistics, which is the reference's computation; with ``backbone.freeze_bn=false``
    (the reference has no such mode) the trained featurizer uses the batch's statistics and
    the oracle does too, its running statistics untouched.
    """

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        miro_lambda: float = 0.1,
        miro_lr_mult: float = 10.0,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        self.miro_lambda = hparam(miro_lambda, "miro_lambda", lambda v: v >= 0, "miro_lambda >= 0", "MIRO")
        self.miro_lr_mult = hparam(miro_lr_mult, "miro_lr_mult", lambda v: v > 0, "miro_lr_mult > 0", "MIRO")
        self.oracle: nn.Module | None = None
        self.variance_encoders = nn.ModuleList()

    def setup_network(self, network: nn.Module) -> None:
        featurizer = network.featurizer
        stem_and_stages(featurizer, "MIRO")
        self.oracle = copy.deepcopy(featurizer).requires_grad_(False)
        channels = first_conv_in_channels(self.oracle, "MIRO")
        size = self.input_shape[1:] if self.input_shape is not None else (64, 64)
        probe = torch.zeros(1, channels, *size, device=next(self.oracle.parameters()).device)
        self.variance_encoders = nn.ModuleList(VarianceEncoder(f.shape[1]) for f in self._oracle_features(probe, None))

    def _oracle_features(self, x: torch.Tensor, featurizer: nn.Module | None) -> list[torch.Tensor]:
        # Normalised as the trained featurizer is now, so the penalty compares like with like.
        with torch.no_grad(), batch_norm_modes_of(self.oracle, featurizer):
            with captured_outputs(stem_and_stages(self.oracle, "MIRO")) as features:
                self.oracle(x)
        return features

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        if self.oracle is None:
            raise RuntimeError("MIRO.setup_network(network) must be called before training")
        x, y = pooled(batches)
        with captured_outputs(stem_and_stages(network.featurizer, "MIRO")) as features:
            logits = network(x)
        classification = F.cross_entropy(logits, y)
        variances = [encoder() for encoder in self.variance_encoders]
        penalty = miro_penalty(features, self._oracle_features(x, network.featurizer), variances)
        return AlgorithmOutput(
            classification + self.miro_lambda * penalty,
            {"classification_loss": classification.detach(), "miro_penalty": penalty.detach()},
        )

    def configure_optimizers(self, network: nn.Module, optimizer: OptimizerFactory) -> torch.optim.Optimizer:
        built = optimizer([p for p in network.parameters() if p.requires_grad])
        built.add_param_group(
            {
                "params": list(self.variance_encoders.parameters()),
                "lr": built.param_groups[0]["lr"] * self.miro_lr_mult,
            }
        )
        return built
