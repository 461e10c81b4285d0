"""MixStyle (Zhou et al., ICLR 2021) as the DomainBed code base of SWAD/MIRO runs it."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from genie_dg.algorithms.base import AlgorithmOutput, DGAlgorithm, DomainBatch, hparam, pooled
from genie_dg.models.timm_resnet import RESIDUAL_STAGES, require_resnet


def mix_styles(x: torch.Tensor, weight: torch.Tensor, partner: torch.Tensor, eps: float) -> torch.Tensor:
    """Re-style each feature map with a mix of its own and its partner's channel statistics.

    Sample ``i`` is normalised by its per-channel mean and standard deviation (over space) and
    re-scaled with ``weight[i]`` times its own statistics plus ``1 - weight[i]`` times those of
    sample ``partner[i]``. The statistics are detached, as in the paper: no gradient flows
    through the style.
    """
    mean = x.mean(dim=(2, 3), keepdim=True).detach()
    std = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    weight = weight.view(-1, 1, 1, 1).to(x)
    mixed_mean = weight * mean + (1 - weight) * mean[partner]
    mixed_std = weight * std + (1 - weight) * std[partner]
    return (x - mean) / std * mixed_std + mixed_mean


class StyleMixer(nn.Module):
    """One MixStyle layer: with probability ``p`` per batch, mixes the statistics of random pairs.

    Partners come from a random permutation of the whole batch (MixStyle "w/ random shuffle",
    DomainBed's ``Mixstyle``) and the weights from Beta(``alpha``, ``alpha``) per sample.
    """

    def __init__(self, p: float, alpha: float, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = p
        self.alpha = alpha
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()).item() >= self.p:
            return x
        batch = x.shape[0]
        concentration = torch.tensor(float(self.alpha))
        weight = torch.distributions.Beta(concentration, concentration).sample((batch,))
        partner = torch.randperm(batch).to(x.device)
        return mix_styles(x, weight.to(x.device), partner, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha}, eps={self.eps}"


def _mix_stage_output(mixer: StyleMixer, stage: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    # Follows the network's mode, not the algorithm's: evaluation never mixes.
    return mixer(output) if stage.training else output


class MixStyle(DGAlgorithm):
    """ERM on a ResNet whose early residual stages are followed by MixStyle layers.

    Zhou et al., "Domain Generalization with MixStyle", ICLR 2021. DomainBed-based code (SWAD's
    and MIRO's ``Mixstyle``) inserts the layer after ``layer1``, ``layer2`` and ``layer3`` with
    ``p = 0.5`` and ``alpha = 0.1``, mixes over the pooled batch of all domains (random shuffle)
    and trains with plain cross-entropy; so does this class. :meth:`setup_network` registers the
    layers as forward hooks on the featurizer's stages, so the network's parameters and
    state-dict keys stay those of the plain ResNet; the hooks act only while the network is in
    training mode. Deviation: whether a layer mixes a batch is drawn from torch's (seeded)
    generator, like the pairing and the weights, instead of Python's ``random``. The
    domain-label variant (``Mixstyle2``) is not implemented.

    Batch normalisation: the reference trains with the ResNet's batch-norm layers in evaluation
    mode (khanrc/swad's ``hparams_registry.py`` sets ``freeze_bn`` true for every algorithm, and
    its ``Mixstyle`` builds the featurizer through ``networks.ResNet``, which honours it), so the
    layers after a MixStyle layer normalise the re-styled maps with the pretrained statistics.
    Here that is ``backbone.freeze_bn``: with ``true`` (the image datasets' default) training
    matches the reference; with ``false`` those layers normalise by the re-styled batch and
    their running statistics follow it. Mixing depends only on the stage's mode, so it is
    active in training either way.
    """

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        mixstyle_p: float = 0.5,
        mixstyle_alpha: float = 0.1,
        mixstyle_layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        owner = "MixStyle"
        self.mixstyle_p = hparam(mixstyle_p, "mixstyle_p", lambda v: 0 <= v <= 1, "0 <= mixstyle_p <= 1", owner)
        self.mixstyle_alpha = hparam(mixstyle_alpha, "mixstyle_alpha", lambda v: v > 0, "mixstyle_alpha > 0", owner)
        layers = list(mixstyle_layers)
        self.mixstyle_layers = hparam(
            layers,
            "mixstyle_layers",
            lambda v: len(v) > 0 and len(set(v)) == len(v) and set(v) <= set(RESIDUAL_STAGES),
            f"distinct stage names out of {list(RESIDUAL_STAGES)}",
            owner,
        )
        self.mixers = nn.ModuleDict({name: StyleMixer(mixstyle_p, mixstyle_alpha) for name in layers})
        self._hooks: list[RemovableHandle] = []

    def setup_network(self, network: nn.Module) -> None:
        resnet = require_resnet(network.featurizer, "MixStyle")
        # A second setup (another network) must not leave the first one mixing twice.
        for handle in self._hooks:
            handle.remove()
        self._hooks = [
            getattr(resnet, name).register_forward_hook(functools.partial(_mix_stage_output, mixer))
            for name, mixer in self.mixers.items()
        ]

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        x, y = pooled(batches)
        return AlgorithmOutput(F.cross_entropy(network(x), y))
