from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genie_dg.algorithms.sagnet import STYLE_EPS, SagNet, randomize_content, randomize_style
from genie_dg.errors import UserInputError
from genie_dg.models import Classifier
from genie_dg.pipeline import instantiate_or_explain

# Sample 0: mean 2, variance 1, content [-1, 0, 1]. Sample 1: mean 1, variance 3,
# content [-1, -1, 2] / sqrt(3).
FEATURES = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
SWAP = torch.tensor([1, 0])


def _content(i: int) -> torch.Tensor:
    variance = [1.0, 3.0][i]
    raw = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]])[i]
    return raw / math.sqrt(variance + STYLE_EPS)


def test_style_randomization_interpolates_mean_and_variance_towards_the_partner():
    alpha = torch.tensor([[0.25], [1.0]])
    out = randomize_style(FEATURES, alpha, SWAP)
    # Sample 0: mean 0.25 * 2 + 0.75 * 1, variance 0.25 * 1 + 0.75 * 3; sample 1 keeps its style.
    expected_0 = _content(0) * math.sqrt(2.5 + STYLE_EPS) + 1.25
    expected_1 = _content(1) * math.sqrt(3.0 + STYLE_EPS) + 1.0
    assert torch.allclose(out, torch.stack([expected_0, expected_1]), atol=1e-6)


def test_content_randomization_borrows_the_partners_detached_content():
    features = FEATURES.clone().requires_grad_()
    out = randomize_content(features, SWAP)
    expected = torch.stack(
        [_content(1) * math.sqrt(1.0 + STYLE_EPS) + 2.0, _content(0) * math.sqrt(3.0 + STYLE_EPS) + 1.0]
    )
    assert torch.allclose(out, expected, atol=1e-6)
    # Through the style statistics only: the mean term gives each feature a gradient of 1 and,
    # as the borrowed content sums to zero, the variance term gives 0.
    out.sum().backward()
    assert torch.allclose(features.grad, torch.ones_like(features))


class TinyFeaturizer(nn.Module):
    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _sagnet_and_network(sag_w_adv: float = 0.1) -> tuple[SagNet, Classifier]:
    torch.manual_seed(0)
    return SagNet(3, 2, 4, sag_w_adv=sag_w_adv), Classifier(TinyFeaturizer(), num_classes=3)


def _connected(loss: torch.Tensor, module: nn.Module) -> bool:
    grads = torch.autograd.grad(loss, list(module.parameters()), retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_each_loss_reaches_only_the_parameters_it_updates():
    sagnet, network = _sagnet_and_network()
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    losses = sagnet.losses(network, x, y)
    reaches = {
        name: [_connected(loss, part) for part in (network.featurizer, network.head, sagnet.style_head)]
        for name, loss in vars(losses).items()
    }
    assert reaches == {
        "content": [True, True, False],
        "style": [False, False, True],
        "adversarial": [True, False, False],
    }


def test_adversarial_loss_of_a_blind_style_head_is_weighted_log_num_classes():
    sagnet, network = _sagnet_and_network(sag_w_adv=0.5)
    with torch.no_grad():
        sagnet.style_head.weight.zero_()
        sagnet.style_head.bias.zero_()
    losses = sagnet.losses(network, torch.randn(8, 3), torch.randint(0, 3, (8,)))
    # Uniform predictions: cross-entropy to the uniform distribution is log(3).
    assert losses.adversarial.item() == pytest.approx(0.5 * math.log(3))
    assert losses.style.item() == pytest.approx(math.log(3))


def test_one_optimizer_holds_featurizer_head_and_style_head_as_groups():
    sagnet, network = _sagnet_and_network()
    optimizer = sagnet.configure_optimizers(network, lambda params: torch.optim.SGD(params, lr=0.1))
    groups = [set(map(id, g["params"])) for g in optimizer.param_groups]
    parts = [set(map(id, m.parameters())) for m in (network.featurizer, network.head, sagnet.style_head)]
    assert groups == parts


def test_evaluation_is_the_content_path_without_randomization():
    sagnet, network = _sagnet_and_network()
    x = torch.randn(5, 3)
    assert torch.equal(sagnet.predict(network, x), network.head(network.featurizer(x)))


def test_single_training_domain_is_enough():
    assert SagNet(3, 1, 4).penalty_active


def test_negative_adversarial_weight_is_rejected():
    with pytest.raises(UserInputError, match=r"algorithm.sag_w_adv=-1.0.*sag_w_adv >= 0"):
        SagNet(3, 2, 4, sag_w_adv=-1.0)


def test_config_defaults_are_domainbeds(make_config):
    sagnet = instantiate_or_explain(make_config("algorithm=sagnet").algorithm)(
        num_classes=3, num_domains=2, num_features=4
    )
    assert isinstance(sagnet, SagNet)
    assert sagnet.sag_w_adv == 0.1
    assert not sagnet.automatic_optimization


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_sagnet_trains_one_step_per_batch_and_checkpoints_the_style_head(train_algorithm, saved_state, optimizer):
    model, trainer = train_algorithm("sagnet", optimizer)
    assert len(trainer.optimizers) == 1
    state = saved_state(trainer)
    for name, tensor in model.algorithm.style_head.state_dict().items():
        assert torch.equal(state[f"algorithm.style_head.{name}"], tensor.cpu())
    # The one optimizer stepped the style head too: it holds state for each of its parameters.
    assert all(trainer.optimizers[0].state[p] for p in model.algorithm.style_head.parameters())
