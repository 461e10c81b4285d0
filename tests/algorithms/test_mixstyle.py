from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

from genie_dg.algorithms import DomainBatch
from genie_dg.algorithms.mixstyle import MixStyle, mix_styles
from genie_dg.errors import UserInputError
from genie_dg.models import Classifier, create_backbone
from genie_dg.models.timm_resnet import captured_outputs, stem_and_stages


def _network() -> Classifier:
    torch.manual_seed(0)
    return Classifier(create_backbone("resnet18", in_chans=1, channels=[8, 16, 32, 64]), num_classes=10)


def test_mix_styles_matches_hand_computation():
    # Sample 0 = [0, 2] (mean 1, std sqrt 2), sample 1 = [10, 14] (mean 12, std sqrt 8).
    x = torch.tensor([[[[0.0, 2.0]]], [[[10.0, 14.0]]]])
    out = mix_styles(x, weight=torch.tensor([0.25, 1.0]), partner=torch.tensor([1, 0]), eps=0.0)
    # Sample 0: mean 0.25 * 1 + 0.75 * 12 = 9.25, std 0.25 * sqrt 2 + 0.75 * sqrt 8 = 1.75 * sqrt 2,
    # so its normalised values -+1/sqrt 2 become 9.25 -+ 1.75; sample 1 keeps its own style.
    assert out[0].flatten().tolist() == pytest.approx([7.5, 11.0])
    assert out[1].flatten().tolist() == pytest.approx([10.0, 14.0])


def test_mixing_follows_the_network_mode_and_the_chosen_stages():
    net, plain = _network(), _network()
    MixStyle(10, 2, 64, mixstyle_p=1.0, mixstyle_layers=["layer3"]).setup_network(net)
    x = torch.randn(6, 1, 28, 28)
    net.eval(), plain.eval()
    assert torch.equal(net(x), plain(x)), "evaluation must never mix"
    net.train(), plain.train()
    with captured_outputs(stem_and_stages(net.featurizer, "test")) as mixed:
        net(x)
    with captured_outputs(stem_and_stages(plain.featurizer, "test")) as reference:
        plain(x)
    # stem, layer1, layer2 untouched; layer3's output is re-styled (its hook), so layer4 differs too.
    assert all(torch.allclose(a, b) for a, b in zip(mixed[:3], reference[:3]))
    assert not torch.allclose(mixed[3], reference[3])
    assert not torch.allclose(mixed[4], reference[4])


def test_probability_zero_never_mixes_in_training():
    net, plain = _network(), _network()
    MixStyle(10, 2, 64, mixstyle_p=0.0).setup_network(net)
    x = torch.randn(6, 1, 28, 28)
    assert torch.equal(net(x), plain(x))


def test_second_setup_does_not_mix_twice():
    net = _network()
    algorithm = MixStyle(10, 2, 64)
    algorithm.setup_network(net)
    algorithm.setup_network(net)
    assert sum(len(getattr(net.featurizer, n)._forward_hooks) for n in ("layer1", "layer2", "layer3")) == 3


def test_training_loss_is_cross_entropy_of_the_pooled_batch():
    net = _network()
    algorithm = MixStyle(10, 2, 64, mixstyle_p=0.0)
    algorithm.setup_network(net)
    batches = [DomainBatch(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), d) for d in range(2)]
    net.eval()
    expected = F.cross_entropy(net(torch.cat([b.x for b in batches])), torch.cat([b.y for b in batches]))
    assert torch.allclose(algorithm.training_loss(net, batches).loss, expected)


def test_rejects_bad_hyper_parameters():
    with pytest.raises(UserInputError, match=r"algorithm\.mixstyle_p=1\.5"):
        MixStyle(10, 2, 64, mixstyle_p=1.5)
    with pytest.raises(UserInputError, match=r"algorithm\.mixstyle_alpha"):
        MixStyle(10, 2, 64, mixstyle_alpha=0.0)
    with pytest.raises(UserInputError, match=r"algorithm\.mixstyle_layers.*layer1"):
        MixStyle(10, 2, 64, mixstyle_layers=["layer5"])


def test_non_resnet_backbone_fails_naming_it():
    net = Classifier(timm.create_model("test_efficientnet", num_classes=0, in_chans=1), num_classes=10)
    with pytest.raises(UserInputError, match="MixStyle needs a timm ResNet.*'test_efficientnet'"):
        MixStyle(10, 2, 64).setup_network(net)


def test_single_training_domain_is_enough():
    assert MixStyle.min_domains == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        algorithm = MixStyle(10, 1, 64)
    net = _network()
    algorithm.setup_network(net)
    out = algorithm.training_loss(net, [DomainBatch(torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), 0)])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_mixstyle_trains_with_each_optimizer_and_keeps_plain_network_keys(train_algorithm, saved_state, optimizer):
    model, trainer = train_algorithm("mixstyle", optimizer)
    assert isinstance(model.algorithm, MixStyle)
    assert model.algorithm.mixstyle_layers == ["layer1", "layer2", "layer3"]
    state = saved_state(trainer)
    assert {k for k in state if k.startswith("algorithm.")} == {"algorithm.update_count"}
    plain_keys = {f"network.{k}" for k in _network().state_dict()}
    assert {k for k in state if k.startswith("network.")} == plain_keys
    assert torch.equal(
        state["network.featurizer.layer1.0.conv1.weight"], model.network.featurizer.layer1[0].conv1.weight
    )
