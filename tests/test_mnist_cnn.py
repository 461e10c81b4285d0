"""DomainBed's MNIST network as a backbone choice."""

from __future__ import annotations

import torch
from torch import nn

from genie_dg.models import Classifier, MnistCNN
from genie_dg.pipeline import instantiate_or_explain


def test_layers_and_parameter_count_are_domainbeds():
    network = MnistCNN(in_chans=1)
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (1, 64, (3, 3), (1, 1)),
        (64, 128, (3, 3), (2, 2)),
        (128, 128, (3, 3), (1, 1)),
        (128, 128, (3, 3), (1, 1)),
    ]
    norms = [m for m in network.modules() if isinstance(m, nn.GroupNorm)]
    assert [(n.num_groups, n.num_channels) for n in norms] == [(8, 64), (8, 128), (8, 128), (8, 128)]
    # 9*(1*64 + 64*128 + 2*128*128) weights, 448 conv biases, 2*448 GroupNorm affine parameters.
    assert sum(p.numel() for p in network.parameters()) == 370_560
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())


def test_features_are_the_spatial_mean_of_the_last_normalised_map():
    network = MnistCNN(in_chans=2).eval()
    x = torch.randn(3, 2, 28, 28)
    features = network(x)
    assert features.shape == (3, MnistCNN.num_features) == (3, 128)
    assert torch.allclose(features, network.body(x).mean(dim=(2, 3)))
    assert network.body(x).shape[-2:] == (14, 14), "the second convolution halves 28 x 28"


def test_backbone_config_builds_it_with_the_datasets_channels(make_config):
    cfg = make_config("backbone=mnist_cnn", "dataset=colored_mnist")
    assert cfg.backbone.freeze_bn is False
    featurizer = instantiate_or_explain(cfg.backbone, in_chans=2)
    assert isinstance(featurizer, MnistCNN)
    assert Classifier(featurizer, num_classes=2)(torch.zeros(4, 2, 14, 14)).shape == (4, 2)
