from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from genie_dg.algorithms import DomainBatch
from genie_dg.algorithms.mtl import MTL, MarginalTransferHead
from genie_dg.errors import UserInputError
from genie_dg.models import Classifier
from genie_dg.pipeline import instantiate_or_explain


@pytest.fixture
def mtl_and_network(make_network) -> Callable[..., tuple[MTL, Classifier]]:
    """``mtl_and_network(mtl_ema, num_domains=2)``: MTL set up on a network of two identity features."""

    def make(mtl_ema: float, num_domains: int = 2) -> tuple[MTL, Classifier]:
        mtl = MTL(num_classes=2, num_domains=num_domains, num_features=2, mtl_ema=mtl_ema)
        network = make_network(num_features=2)
        mtl.setup_network(network)
        with torch.no_grad():
            # Class 0 reads the first feature, class 1 the first embedding coordinate.
            network.head.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
            network.head.linear.bias.zero_()
        return mtl, network

    return make


DOMAIN_A = DomainBatch(torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([0, 1]), 0)  # mean [2, 1]
DOMAIN_B = DomainBatch(torch.tensor([[0.0, 4.0], [-2.0, 0.0]]), torch.tensor([1, 1]), 3)  # mean [-1, 2]


def test_setup_replaces_the_head_and_evaluation_embeds_the_batch_by_its_mean(mtl_and_network):
    mtl, network = mtl_and_network(0.99)
    assert isinstance(network.head, MarginalTransferHead)
    assert network.head.linear.in_features == 4
    # Logits [x0, mean(x0)] for the batch with first features 1 and 3 (mean 2).
    expected = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    assert torch.allclose(mtl.predict(network, DOMAIN_A.x), expected)
    assert torch.allclose(network(DOMAIN_A.x), expected)


def test_loss_sums_domain_cross_entropies_with_blended_embeddings(mtl_and_network):
    mtl, network = mtl_and_network(0.5)
    out = mtl.training_loss(network, [DOMAIN_A, DOMAIN_B])
    # Stored embeddings start at zero: embedding = 0.5 * batch mean.
    assert torch.allclose(mtl.embeddings, torch.tensor([[1.0, 0.5], [-0.5, 1.0]]))
    logits_a = torch.tensor([[1.0, 1.0], [3.0, 1.0]])
    logits_b = torch.tensor([[0.0, -0.5], [-2.0, -0.5]])
    expected = F.cross_entropy(logits_a, DOMAIN_A.y) + F.cross_entropy(logits_b, DOMAIN_B.y)
    assert torch.allclose(out.loss, expected)


def test_embeddings_update_once_per_step_and_carry_the_previous_step(mtl_and_network):
    mtl, network = mtl_and_network(0.5)
    first = mtl.training_loss(network, [DOMAIN_A, DOMAIN_B]).loss
    after_first = mtl.embeddings.clone()
    # A closure-based optimizer re-evaluating the same step sees the same function.
    again = mtl.training_loss(network, [DOMAIN_A, DOMAIN_B]).loss
    assert torch.equal(mtl.embeddings, after_first)
    assert torch.allclose(again, first)
    mtl.update_count += 1
    mtl.training_loss(network, [DOMAIN_A, DOMAIN_B])
    # 0.5 * mean + 0.5 * (0.5 * mean) = 0.75 * mean.
    assert torch.allclose(mtl.embeddings, torch.tensor([[1.5, 0.75], [-0.75, 1.5]]))


def test_ema_one_uses_the_batch_mean_and_gradients_flow_through_it(mtl_and_network):
    mtl, network = mtl_and_network(1.0)
    x = DOMAIN_A.x.clone().requires_grad_()
    mtl.training_loss(network, [DomainBatch(x, DOMAIN_A.y, 0), DOMAIN_B]).loss.backward()
    assert torch.allclose(mtl.embeddings, torch.tensor([[2.0, 1.0], [-1.0, 2.0]]))
    # d loss / d x[:, 0] has a term through the embedding (weight on mean(x0)) for both rows.
    probabilities = F.softmax(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), dim=1)
    grad_logits = (probabilities - F.one_hot(DOMAIN_A.y, 2)) / 2
    expected = grad_logits[:, 0] + grad_logits[:, 1].sum() / 2
    assert torch.allclose(x.grad[:, 0], expected)


def test_single_training_domain_is_enough(mtl_and_network):
    mtl, network = mtl_and_network(0.99, num_domains=1)
    assert mtl.penalty_active
    assert torch.isfinite(mtl.training_loss(network, [DOMAIN_A]).loss)


@pytest.mark.parametrize("value", [-0.1, 1.1])
def test_ema_outside_the_unit_interval_is_rejected(value):
    with pytest.raises(UserInputError, match=r"algorithm.mtl_ema=.*0 <= mtl_ema <= 1"):
        MTL(2, 2, 2, mtl_ema=value)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_mtl_trains_with_each_optimizer_and_checkpoints_embeddings(train_algorithm, saved_state, optimizer):
    model, trainer = train_algorithm("mtl", optimizer)
    state = saved_state(trainer)
    embeddings = model.algorithm.embeddings.detach().cpu()
    assert embeddings.shape == (model.algorithm.num_domains, model.network.num_features)
    assert embeddings.abs().sum() > 0, "training must fill the domain embeddings"
    assert torch.equal(state["algorithm.embeddings"], embeddings)
    assert torch.equal(state["network.head.linear.weight"], model.network.head.linear.weight.detach().cpu())


def test_config_defaults_are_domainbeds(make_config):
    mtl = instantiate_or_explain(make_config("algorithm=mtl").algorithm)(num_classes=2, num_domains=3, num_features=2)
    assert isinstance(mtl, MTL)
    assert mtl.mtl_ema == 0.99
    assert torch.equal(mtl.embeddings, torch.zeros(3, 2))
