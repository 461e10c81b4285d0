"""Adaptive Risk Minimization, ARM-CML (Zhang et al., NeurIPS 2021), as DomainBed defines it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import AlgorithmOutput, DGAlgorithm, DomainBatch, hparam, pooled
from genie_dg.errors import UserInputError
from genie_dg.models.timm_resnet import first_conv_in_channels, widen_first_conv


def context_network(in_channels: int, hidden: int = 64, kernel_size: int = 5) -> nn.Sequential:
    """DomainBed's ``ContextNet``: three same-size convolutions down to one context channel."""
    padding = (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size, padding=padding),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, kernel_size, padding=padding),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, 1, kernel_size, padding=padding),
    )


class ARM(DGAlgorithm):
    """ARM-CML: the classifier sees each image together with the mean context of its group.

    Zhang et al., "Adaptive Risk Minimization: Learning to Adapt to Domain Shift", NeurIPS 2021.
    Following DomainBed's ``ARM``, a context network maps every image to one channel of the image's size; the
    mean of that channel over a group of images (the support set) is appended to each image of
    the group as an extra input channel, and the loss is the cross-entropy of the pooled batch
    (ERM's). In training each domain's minibatch is one group; in :meth:`predict` the evaluation
    batch is cut into consecutive groups of ``support_size`` images when its length is a
    multiple of it, else the whole batch is one group. DomainBed's support size is its
    ``batch_size`` hyper-parameter, the per-domain training batch (8 on its image datasets,
    64 on the MNISTs); ``support_size=None`` (the default) takes the per-domain batch size of
    the training steps, kept in the ``trained_support_size`` buffer so a restored checkpoint
    predicts alike. Before the first training step (Lightning's sanity validation) it is not
    known yet and each evaluation batch is one group.

    :meth:`setup_network` widens the featurizer's first convolution by the context channel,
    keeping the weights of the image channels; the context channel starts from the weights of
    image channel 0, as DomainBed's ResNet fills its added input channels. Deviation: DomainBed
    cuts the pooled training batch into ``support_size`` groups, which are the domains' batches
    only while all have that size; here the groups are the domains' batches by construction.

    ``train_context_net`` (default ``False``, DomainBed's behaviour): whether the context
    network's weights are optimized. DomainBed's ``ARM`` builds its optimizer (in ``ERM``'s
    constructor) over the main network before the context network exists, so the context
    network keeps its random initial weights and only its batch-norm running statistics move;
    DomainBed's published ARM numbers come from that. ``False`` reproduces it (the weights do
    not require gradients and are in no optimizer); ``True`` trains the context network
    jointly with the classifier, as the ARM paper does. The default follows DomainBed because
    its tables are what this project's results are compared with.
    """

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        support_size: int | None = None,
        train_context_net: bool = False,
        input_shape: Sequence[int] | None = None,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, input_shape=input_shape, **base)
        self.support_size = hparam(
            support_size,
            "support_size",
            lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
            "an integer >= 1, or null for the per-domain training batch size (DomainBed's)",
            "ARM",
        )
        self.register_buffer("trained_support_size", torch.zeros((), dtype=torch.long))
        if self.input_shape is None:
            raise UserInputError("ARM needs the input shape (channels, height, width) for its context network")
        self.train_context_net = hparam(
            train_context_net, "train_context_net", lambda v: isinstance(v, bool), "true or false", "ARM"
        )
        # Frozen weights are left out of the optimizer (DGAlgorithm.configure_optimizers), as in DomainBed.
        self.context_net = context_network(self.input_shape[0]).requires_grad_(train_context_net)

    def setup_network(self, network: nn.Module) -> None:
        channels = first_conv_in_channels(network.featurizer, "ARM")
        if channels != self.input_shape[0]:
            raise UserInputError(
                f"ARM: the featurizer's first convolution takes {channels} channels but the images "
                f"have {self.input_shape[0]}; set up ARM once, on a featurizer built for the images"
            )
        widen_first_conv(network.featurizer, 1, "ARM")

    def _with_context(self, x: torch.Tensor, group_sizes: Sequence[int]) -> torch.Tensor:
        contexts = self.context_net(x).split(list(group_sizes))
        context = torch.cat([c.mean(0, keepdim=True).expand_as(c) for c in contexts])
        return torch.cat([x, context], dim=1)

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        x, y = pooled(batches)
        # Idempotent, so re-evaluating the loss (closure optimizers) changes nothing.
        self.trained_support_size.fill_(len(batches[0].x))
        logits = network(self._with_context(x, [len(b.x) for b in batches]))
        return AlgorithmOutput(F.cross_entropy(logits, y))

    def predict(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        size = self.support_size or int(self.trained_support_size) or len(x)
        if len(x) % size != 0:
            size = len(x)
        return network(self._with_context(x, [size] * (len(x) // size)))
