"""Style-Agnostic Networks (Nam et al., 2021) as DomainBed defines it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from genie_dg.algorithms.base import (
    AlgorithmOutput,
    DGAlgorithm,
    DomainBatch,
    OptimizerFactory,
    StepContext,
    hparam,
    pooled,
)

# DomainBed's variance floor when normalising features.
STYLE_EPS = 1e-5


def _style_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's mean and (unbiased) variance over its features, and its normalised features."""
    mean = features.mean(-1, keepdim=True)
    var = features.var(-1, keepdim=True)
    return mean, var, (features - mean) / (var + STYLE_EPS).sqrt()


def randomize_style(features: torch.Tensor, alpha: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Each sample's normalised features with its style (mean, variance) interpolated towards
    that of sample ``permutation[i]``: ``alpha * own + (1 - alpha) * other``.

    ``features`` is (batch, features), ``alpha`` (batch, 1) in [0, 1].
    """
    mean, var, content = _style_statistics(features)
    mixed_mean = alpha * mean + (1 - alpha) * mean[permutation]
    mixed_var = alpha * var + (1 - alpha) * var[permutation]
    return content * (mixed_var + STYLE_EPS).sqrt() + mixed_mean


def randomize_content(features: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Sample ``permutation[i]``'s normalised features carrying sample i's style.

    The borrowed content is detached, so gradients reach the features only through the style
    statistics, as in DomainBed.
    """
    mean, var, content = _style_statistics(features)
    return content[permutation].detach() * (var + STYLE_EPS).sqrt() + mean


@dataclass
class SagNetLosses:
    """SagNet's three losses of one step (the adversarial one already weighted)."""

    content: torch.Tensor
    style: torch.Tensor
    adversarial: torch.Tensor

    def total(self) -> torch.Tensor:
        return self.content + self.style + self.adversarial


class SagNet(DGAlgorithm):
    """Style-Agnostic Networks (Nam, Lee, Park, Yoon & Yoo, CVPR 2021), as DomainBed.

    The network's featurizer and head are SagNet's feature and content networks; a second
    linear head, ``style_head`` (checkpointed), is the style network. Each step has three
    losses on the pooled minibatch:

    - content: cross-entropy of the head on features whose style is randomised
      (:func:`randomize_style`), for the featurizer and the head;
    - style: cross-entropy of the style head on features whose content is randomised
      (:func:`randomize_content`), for the style head only;
    - adversarial: ``sag_w_adv`` times the cross-entropy between the style head's prediction
      on content-randomised features and the uniform distribution, for the featurizer only
      (it makes the features useless to a classifier that sees only style).

    Evaluation is ``head(featurizer(x))`` without randomisation.

    Optimisation: DomainBed has three Adam optimizers (featurizer, content, style) and, per
    step, three sequential updates (content: featurizer and head; style: style head;
    adversarial: featurizer again), each after a fresh forward pass. Here one optimizer (the
    configured one) holds three parameter groups (featurizer, head, style head; same settings,
    as DomainBed's three optimizers) and :meth:`manual_step` composes each group's gradient
    from the losses that update it in DomainBed (featurizer: content + adversarial; head:
    content; style head: style), all evaluated at the step's starting weights from one
    featurizer forward pass, then makes exactly one ``optimizer.step()``. So
    ``trainer.max_steps`` counts training steps, any optimizer (GENIE included) applies
    unchanged, and a closure-based optimizer re-evaluates all three losses. The deviation: the
    updates are simultaneous, not sequential, and the featurizer takes one step on the sum of
    its two gradients rather than two steps; batch normalisation sees the batch once, not
    three times.
    """

    automatic_optimization = False

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        sag_w_adv: float = 0.1,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        self.sag_w_adv = hparam(sag_w_adv, "sag_w_adv", lambda v: v >= 0, "sag_w_adv >= 0", "SagNet")
        self.style_head = nn.Linear(num_features, num_classes)

    def losses(self, network: nn.Module, x: torch.Tensor, y: torch.Tensor) -> SagNetLosses:
        """The three losses, each connected only to the parameters it updates."""
        features = network.features(x)
        batch = len(features)

        def draw_permutation() -> torch.Tensor:
            return torch.randperm(batch, device=features.device)

        alpha = torch.rand(batch, 1, device=features.device, dtype=features.dtype)
        content = F.cross_entropy(network.head(randomize_style(features, alpha, draw_permutation())), y)
        style_logits = self.style_head(randomize_content(features.detach(), draw_permutation()))
        style = F.cross_entropy(style_logits, y)
        frozen_style_head = {name: p.detach() for name, p in self.style_head.named_parameters()}
        adversarial_logits = functional_call(
            self.style_head, frozen_style_head, (randomize_content(features, draw_permutation()),)
        )
        adversarial = -F.log_softmax(adversarial_logits, dim=1).mean(1).mean()
        return SagNetLosses(content, style, self.sag_w_adv * adversarial)

    def manual_step(self, step: StepContext, batches: list[DomainBatch]) -> AlgorithmOutput:
        x, y = pooled(batches)
        optimizer = step.optimizer
        evaluated: list[SagNetLosses] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            losses = self.losses(step.network, x, y)
            step.backward(losses.total())
            evaluated.append(losses)
            return losses.total()

        optimizer.step(closure=closure)
        losses = evaluated[0]
        return AlgorithmOutput(
            losses.total().detach(),
            {
                "content_loss": losses.content.detach(),
                "style_loss": losses.style.detach(),
                "adversarial_loss": losses.adversarial.detach(),
            },
        )

    def configure_optimizers(self, network: nn.Module, optimizer: OptimizerFactory) -> torch.optim.Optimizer:
        groups = [
            [p for p in part.parameters() if p.requires_grad]
            for part in (network.featurizer, network.head, self.style_head)
        ]
        return optimizer([{"params": params} for params in groups if params])
