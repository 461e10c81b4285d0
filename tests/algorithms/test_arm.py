from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

from genie_dg.algorithms import DomainBatch
from genie_dg.algorithms.arm import ARM
from genie_dg.errors import UserInputError
from genie_dg.models import Classifier, create_backbone


def _network(in_chans: int = 1) -> Classifier:
    torch.manual_seed(0)
    return Classifier(create_backbone("resnet18", in_chans=in_chans, channels=[8, 16, 32, 64]), num_classes=10)


def _arm(in_chans: int = 1, num_domains: int = 2, support_size: int = 4) -> tuple[ARM, Classifier]:
    torch.manual_seed(1)
    algorithm = ARM(10, num_domains, 64, support_size=support_size, input_shape=(in_chans, 28, 28))
    net = _network(in_chans)
    algorithm.setup_network(net)
    return algorithm, net


@pytest.mark.parametrize("in_chans", [1, 3])
def test_first_conv_gains_a_context_channel_and_keeps_the_image_weights(in_chans):
    original = _network(in_chans).featurizer.conv1.weight.detach().clone()
    _, net = _arm(in_chans)
    widened = net.featurizer.conv1.weight
    assert widened.shape == (original.shape[0], in_chans + 1, *original.shape[2:])
    assert torch.equal(widened[:, :in_chans], original)
    # DomainBed fills added channels cyclically from the image channels: the context gets channel 0.
    assert torch.equal(widened[:, in_chans], original[:, 0])
    assert widened.requires_grad


def test_training_loss_appends_each_domains_mean_context():
    algorithm, net = _arm()
    batches = [DomainBatch(torch.randn(4, 1, 28, 28) + d, torch.randint(0, 10, (4,)), d) for d in range(2)]
    x = torch.cat([b.x for b in batches])
    y = torch.cat([b.y for b in batches])
    torch.manual_seed(2)
    loss = algorithm.training_loss(net, batches).loss
    context = algorithm.context_net(x)
    per_domain = torch.cat(
        [context[:4].mean(0, keepdim=True).repeat(4, 1, 1, 1), context[4:].mean(0, keepdim=True).repeat(4, 1, 1, 1)]
    )
    expected = F.cross_entropy(net(torch.cat([x, per_domain], dim=1)), y)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_predict_adapts_to_groups_of_the_test_batch():
    algorithm, net = _arm(support_size=4)
    net.eval(), algorithm.eval()
    x = torch.randn(8, 1, 28, 28)
    changed = x.clone()
    changed[5] += 3.0
    before, after = algorithm.predict(net, x), algorithm.predict(net, changed)
    # Groups are [0..3] and [4..7]: sample 4 sees 5's change through the shared context, 0..3 do not.
    assert torch.equal(before[:4], after[:4])
    assert not torch.allclose(before[4], after[4])
    # A batch that is no multiple of support_size is one group: sample 0 now sees the change.
    assert not torch.allclose(algorithm.predict(net, x[:6])[0], algorithm.predict(net, changed[:6])[0])


def test_support_size_defaults_to_the_training_batch_per_domain():
    algorithm, net = _arm(support_size=None)
    x = torch.randn(8, 1, 28, 28)
    changed = x.clone()
    changed[5] += 3.0
    net.eval(), algorithm.eval()
    # Before training the whole test batch is one group.
    assert not torch.allclose(algorithm.predict(net, x)[0], algorithm.predict(net, changed)[0])
    algorithm.train()
    algorithm.training_loss(net, [DomainBatch(torch.randn(4, 1, 28, 28), torch.arange(4), d) for d in range(2)])
    assert int(algorithm.trained_support_size) == 4
    algorithm.eval()
    assert torch.equal(algorithm.predict(net, x)[:4], algorithm.predict(net, changed)[:4])


def test_rejects_bad_support_size_and_missing_input_shape():
    with pytest.raises(UserInputError, match=r"algorithm\.support_size=0"):
        ARM(10, 2, 64, support_size=0, input_shape=(1, 28, 28))
    with pytest.raises(UserInputError, match="input shape"):
        ARM(10, 2, 64)


def test_non_resnet_backbone_fails_naming_it():
    net = Classifier(timm.create_model("test_efficientnet", num_classes=0, in_chans=1), num_classes=10)
    with pytest.raises(UserInputError, match="ARM needs a timm ResNet.*'test_efficientnet'"):
        ARM(10, 2, 64, input_shape=(1, 28, 28)).setup_network(net)


def test_second_setup_is_refused():
    algorithm, net = _arm()
    with pytest.raises(UserInputError, match="takes 2 channels but the images have 1"):
        algorithm.setup_network(net)


def test_single_training_domain_is_enough():
    assert ARM.min_domains == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        algorithm, net = _arm(num_domains=1)
    out = algorithm.training_loss(net, [DomainBatch(torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), 0)])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_arm_trains_with_each_optimizer_and_checkpoints_the_context_net(train_algorithm, saved_state, optimizer):
    model, trainer = train_algorithm("arm", optimizer)
    state = saved_state(trainer)
    assert int(state["algorithm.trained_support_size"]) == 8, "the support size is dataset.batch_size"
    for key, tensor in model.algorithm.context_net.state_dict().items():
        assert torch.equal(state[f"algorithm.context_net.{key}"], tensor.cpu())
    assert state["network.featurizer.conv1.weight"].shape[1] == 2
