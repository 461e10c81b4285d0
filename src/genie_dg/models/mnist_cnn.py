"""DomainBed's network for its MNIST datasets (``MNIST_CNN`` in DomainBed's ``networks.py``)."""

from __future__ import annotations

import torch
from torch import nn

# Output channels and stride of the four 3x3 convolutions.
_LAYERS = ((64, 1), (128, 2), (128, 1), (128, 1))
_GROUPS = 8


class MnistCNN(nn.Module):
    """Four 3x3 convolutions (64, 128, 128, 128 channels; the second halves the resolution),
    each followed by ReLU and then GroupNorm with 8 groups, and a global average pool: a
    128-dimensional feature vector (``num_features``). No head: :class:`Classifier` adds the
    linear one, as DomainBed's ERM does. GroupNorm, not BatchNorm, so ``freeze_bn`` changes
    nothing here. ``in_chans`` is 1 for RotatedMNIST, 2 for ColoredMNIST; 370,560 parameters
    for one channel.
    """

    num_features = _LAYERS[-1][0]

    def __init__(self, in_chans: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for width, stride in _LAYERS:
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, stride=stride, padding=1),
                nn.ReLU(),
                nn.GroupNorm(_GROUPS, width),
            ]
            channels = width
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))
