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

from genie_dg.algorithms.base import AlgorithmOutput, DGAlgorithm, DomainBatch, OptimizerFactory, hparam
from genie_dg.algorithms.timm_resnet import captured_outputs, first_conv_in_channels, stem_and_stages


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
def evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` and its children in evaluation mode, then restore each one's mode.

    The oracle keeps the training flags Lightning gives it (Lightning warns about modules left
    in evaluation mode at the start of training) and is evaluated in this block only.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
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
    :meth:`setup_network`, i.e. the pretrained (or initial) weights, run with batch
    normalisation in evaluation mode; the mean encoders are identities and the variance
    encoders learn one variance per channel (initial 0.1) with ``miro_lr_mult`` times the
    optimizer's learning rate. Deviation: MIRO's featurizer freezes batch normalisation
    statistics as DomainBed's ResNet does; the trained featurizer here keeps the project's
    backbone behaviour (batch statistics in training).
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
        self.variance_encoders = nn.ModuleList(VarianceEncoder(f.shape[1]) for f in self._oracle_features(probe))

    def _oracle_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Batch normalisation on running statistics: the oracle is a fixed function of x.
        with torch.no_grad(), evaluation_mode(self.oracle):
            with captured_outputs(stem_and_stages(self.oracle, "MIRO")) as features:
                self.oracle(x)
        return features

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        if self.oracle is None:
            raise RuntimeError("MIRO.setup_network(network) must be called before training")
        x = torch.cat([b.x for b in batches])
        y = torch.cat([b.y for b in batches])
        with captured_outputs(stem_and_stages(network.featurizer, "MIRO")) as features:
            logits = network(x)
        classification = F.cross_entropy(logits, y)
        variances = [encoder() for encoder in self.variance_encoders]
        penalty = miro_penalty(features, self._oracle_features(x), variances)
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
