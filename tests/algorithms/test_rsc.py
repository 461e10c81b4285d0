from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms import DomainBatch
from genie_dg.algorithms.rsc import RSC, rsc_keep_mask
from genie_dg.errors import UserInputError
from genie_dg.models import Classifier
from genie_dg.pipeline import instantiate_or_explain


def _with_known_head(network: Classifier) -> Classifier:
    """``network`` with a head whose true-class gradient is W[y]: class 0 -> [0, 1, 2], class 1 ->
    [2, 0, 1]."""
    with torch.no_grad():
        network.head.weight.copy_(torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 1.0]]))
        network.head.bias.zero_()
    return network


# Per sample, the 2/3 quantile of [0, 1, 2] (class 0) or [2, 0, 1] (class 1) is 4/3, so the
# largest-gradient feature (2 for class 0, 0 for class 1) is muted.
FEATURE_MASK = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
FEATURES = torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.5], [4.0, 0.0, 0.0]])
LABELS = torch.tensor([0, 1, 0, 1])


def _true_class_drop(head: nn.Module, index: int) -> float:
    logits = head(FEATURES[index : index + 1])
    muted = head(FEATURES[index : index + 1] * FEATURE_MASK[index])
    label = LABELS[index]
    return (F.softmax(logits, 1)[0, label] - F.softmax(muted, 1)[0, label]).item()


def test_mask_mutes_largest_gradient_features_of_the_most_affected_samples(make_network):
    # Each sample's only active feature is the muted one, so muting drops its true-class
    # probability to 1/2 from sigmoid(margin): margins 3, 2, 0.5, 8 -> samples 0 and 3 drop most.
    head = _with_known_head(make_network()).head
    drops = [_true_class_drop(head, i) for i in range(4)]
    assert sorted(range(4), key=drops.__getitem__)[2:] == [0, 3]
    keep = rsc_keep_mask(head, FEATURES, LABELS, feature_drop_factor=1 / 3, batch_drop_factor=0.5)
    # The median drop splits the batch: samples 1 and 2 keep all features.
    expected = torch.stack([FEATURE_MASK[0], torch.ones(3), torch.ones(3), FEATURE_MASK[3]])
    assert torch.equal(keep, expected)


def test_batch_drop_factor_one_mutes_every_sample_and_zero_mutes_only_the_largest_drop(make_network):
    head = _with_known_head(make_network()).head
    every = rsc_keep_mask(head, FEATURES, LABELS, feature_drop_factor=1 / 3, batch_drop_factor=1.0)
    # The 0-quantile is the smallest drop; no drop lies strictly below it, so all are muted.
    assert torch.equal(every, FEATURE_MASK)
    largest_only = rsc_keep_mask(head, FEATURES, LABELS, feature_drop_factor=1 / 3, batch_drop_factor=0.0)
    expected = torch.ones(4, 3)
    expected[3] = FEATURE_MASK[3]
    assert torch.equal(largest_only, expected)


def test_mask_matches_numpy_percentiles_on_random_data():
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 5)
    features = torch.randn(32, 16, generator=generator)
    labels = torch.randint(0, 5, (32,), generator=generator)
    keep = rsc_keep_mask(head, features, labels, feature_drop_factor=0.25, batch_drop_factor=0.4)
    weight, bias = head.weight.detach().numpy(), head.bias.detach().numpy()
    gradients = weight[labels.numpy()]  # d(true-class logit)/d(features) of a linear head
    feature_keep = gradients < np.percentile(gradients, 75, axis=1, keepdims=True)

    def true_probability(f: np.ndarray) -> np.ndarray:
        logits = f @ weight.T + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True))[np.arange(32), labels.numpy()]

    x = features.numpy()
    changes = true_probability(x) - true_probability(x * feature_keep)
    expected = feature_keep | (changes < np.percentile(changes, 60))[:, None]
    assert np.array_equal(keep.numpy().astype(bool), expected)
    assert 0 < (~expected).sum() < expected.size


def test_loss_is_cross_entropy_of_the_muted_features(make_network):
    network = _with_known_head(make_network())
    batches = [DomainBatch(FEATURES[:2], LABELS[:2], 0), DomainBatch(FEATURES[2:], LABELS[2:], 1)]
    out = RSC(2, 2, 3, rsc_f_drop_factor=1 / 3, rsc_b_drop_factor=0.5).training_loss(network, batches)
    keep = torch.stack([FEATURE_MASK[0], torch.ones(3), torch.ones(3), FEATURE_MASK[3]])
    expected = F.cross_entropy(network.head(FEATURES * keep), LABELS)
    assert torch.allclose(out.loss, expected)
    assert out.metrics["muted_fraction"].item() == pytest.approx(2 / 12)
    out.loss.backward()
    # The mask carries no gradient: the head's gradient is that of the fixed-mask loss.
    reference = _with_known_head(make_network())
    F.cross_entropy(reference.head(FEATURES * keep), LABELS).backward()
    assert torch.allclose(network.head.weight.grad, reference.head.weight.grad)


def test_single_training_domain_is_enough(make_network):
    rsc = RSC(2, 1, 3)
    assert rsc.penalty_active
    out = rsc.training_loss(_with_known_head(make_network()), [DomainBatch(FEATURES, LABELS, 0)])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", ["rsc_f_drop_factor", "rsc_b_drop_factor"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_drop_factors_outside_the_unit_interval_are_rejected(name, value):
    with pytest.raises(UserInputError, match=f"algorithm.{name}=.*0 <= {name} <= 1"):
        RSC(2, 2, 3, **{name: value})


def test_config_defaults_are_domainbeds(make_config):
    rsc = instantiate_or_explain(make_config("algorithm=rsc").algorithm)(num_classes=2, num_domains=2, num_features=3)
    assert isinstance(rsc, RSC)
    assert rsc.rsc_f_drop_factor == pytest.approx(1 / 3)
    assert rsc.rsc_b_drop_factor == pytest.approx(1 / 3)


def test_rsc_genie_experiment_composes_rsc_with_genie(make_config):
    cfg = make_config("experiment=rsc_genie")
    assert cfg.algorithm._target_ == "genie_dg.algorithms.rsc.RSC"
    assert cfg.optimizer._target_ == "genie_dg.optim.GENIE"
    optimizer = instantiate_or_explain(cfg.optimizer)([nn.Parameter(torch.zeros(2))])
    assert type(optimizer).__name__ == "GENIE"
    algorithm = instantiate_or_explain(cfg.algorithm)(num_classes=2, num_domains=2, num_features=3)
    assert isinstance(algorithm, RSC)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_rsc_trains_with_each_optimizer(train_algorithm, saved_state, optimizer):
    model, trainer = train_algorithm("rsc", optimizer)
    state = saved_state(trainer)
    assert int(state["algorithm.update_count"]) == 3
    assert torch.equal(state["network.head.weight"], model.network.head.weight.detach().cpu())
