from __future__ import annotations

import functools
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

from genie_dg.algorithms import DomainBatch
from genie_dg.algorithms.miro import MIRO, miro_penalty
from genie_dg.errors import UserInputError
from genie_dg.models import Classifier, create_backbone


def _network() -> Classifier:
    torch.manual_seed(0)
    return Classifier(create_backbone("resnet18", in_chans=1, channels=[8, 16, 32, 64]), num_classes=10)


def _miro(num_domains: int = 2, **hparams) -> tuple[MIRO, Classifier]:
    algorithm = MIRO(10, num_domains, 64, input_shape=(1, 28, 28), **hparams)
    net = _network()
    algorithm.setup_network(net)
    return algorithm, net


def _batches() -> list[DomainBatch]:
    torch.manual_seed(3)
    return [DomainBatch(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), d) for d in range(2)]


def _stage_outputs(featurizer, x: torch.Tensor) -> list[torch.Tensor]:
    """Stem and stage outputs by an explicit forward, independent of MIRO's hooks."""
    stem = featurizer.maxpool(featurizer.act1(featurizer.bn1(featurizer.conv1(x))))
    outputs = [stem]
    for name in ("layer1", "layer2", "layer3", "layer4"):
        outputs.append(getattr(featurizer, name)(outputs[-1]))
    return outputs


def test_penalty_matches_hand_computation():
    f = [torch.tensor([1.0, 3.0]).view(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)]
    f0 = [torch.tensor([0.0, 1.0]).view(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)]
    var = [torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 2.0)]
    # Layer 1: mean(1/0.5, 4/0.5) / 2 + log(0.5) / 2 = 2.5 - log(2) / 2; layer 2: log(2) / 2.
    assert miro_penalty(f, f0, var).item() == pytest.approx(2.5)


def test_unchanged_network_costs_only_the_log_variance():
    algorithm, net = _miro()
    net.eval()
    out = algorithm.training_loss(net, _batches())
    assert [e.raw_variance.shape[1] for e in algorithm.variance_encoders] == [64, 8, 16, 32, 64]
    # Five layers, features equal to the oracle's, every variance at its initial 0.1.
    assert out.metrics["miro_penalty"].item() == pytest.approx(5 * math.log(0.1) / 2, rel=1e-4)


def test_loss_is_cross_entropy_plus_lambda_times_the_penalty_of_the_stage_features():
    algorithm, net = _miro(miro_lambda=0.5)
    with torch.no_grad():
        net.featurizer.layer2[0].conv1.weight.mul_(1.5)
        algorithm.variance_encoders[1].raw_variance.fill_(0.3)
    net.eval()
    batches = _batches()
    x = torch.cat([b.x for b in batches])
    y = torch.cat([b.y for b in batches])
    out = algorithm.training_loss(net, batches)
    with torch.no_grad():
        f, f0 = _stage_outputs(net.featurizer, x), _stage_outputs(algorithm.oracle.eval(), x)
    variances = [F.softplus(e.raw_variance) + 1e-5 for e in algorithm.variance_encoders]
    expected = sum(((a - b) ** 2 / v + v.log()).mean() / 2 for a, b, v in zip(f, f0, variances))
    assert out.metrics["miro_penalty"].item() == pytest.approx(expected.item(), rel=1e-5)
    ce = F.cross_entropy(net(x), y)
    assert out.loss.item() == pytest.approx((ce + 0.5 * expected).item(), rel=1e-5)
    assert out.metrics["miro_penalty"].item() > 5 * math.log(0.1) / 2 + 0.01, "perturbed features cost more"


def test_oracle_is_a_frozen_copy_with_fixed_statistics_and_encoders_get_lr_mult():
    algorithm, net = _miro(miro_lr_mult=10.0)
    oracle_before = {k: v.clone() for k, v in algorithm.oracle.state_dict().items()}
    assert all(torch.equal(oracle_before[k], v) for k, v in net.featurizer.state_dict().items())
    assert not any(p.requires_grad for p in algorithm.oracle.parameters())
    running_mean = algorithm.oracle.bn1.running_mean.clone()
    algorithm.train()
    algorithm.training_loss(net.train(), _batches())
    assert torch.equal(algorithm.oracle.bn1.running_mean, running_mean), "the oracle's running statistics never move"
    assert algorithm.oracle.training, "but keeps the mode Lightning set"
    optimizer = algorithm.configure_optimizers(net, functools.partial(torch.optim.Adam, lr=1e-3))
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, pytest.approx(1e-2)]
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in [*net.parameters(), *algorithm.variance_encoders.parameters()]}
    variance_before = algorithm.variance_encoders[0].raw_variance.detach().clone()
    net.train()
    for _ in range(2):
        optimizer.zero_grad()
        algorithm.training_loss(net, _batches()).loss.backward()
        optimizer.step()
    assert all(torch.equal(oracle_before[k], v) for k, v in algorithm.oracle.state_dict().items())
    assert not torch.equal(variance_before, algorithm.variance_encoders[0].raw_variance)
    assert not torch.equal(oracle_before["conv1.weight"], net.featurizer.conv1.weight)


def test_rejects_bad_hyper_parameters_and_training_before_setup():
    with pytest.raises(UserInputError, match=r"algorithm\.miro_lambda=-1"):
        MIRO(10, 2, 64, miro_lambda=-1)
    with pytest.raises(UserInputError, match=r"algorithm\.miro_lr_mult"):
        MIRO(10, 2, 64, miro_lr_mult=0)
    with pytest.raises(RuntimeError, match="setup_network"):
        MIRO(10, 2, 64).training_loss(_network(), _batches())


def test_non_resnet_backbone_fails_naming_it():
    net = Classifier(timm.create_model("test_vit", num_classes=0), num_classes=10)
    with pytest.raises(UserInputError, match="MIRO needs a timm ResNet.*'test_vit'"):
        MIRO(10, 2, 64).setup_network(net)


def test_single_training_domain_is_enough():
    assert MIRO.min_domains == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        algorithm, net = _miro(num_domains=1)
    out = algorithm.training_loss(net, _batches()[:1])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_miro_trains_with_each_optimizer_and_checkpoints_oracle_and_encoders(train_algorithm, saved_state, optimizer):
    model, trainer = train_algorithm("miro", optimizer)
    state = saved_state(trainer)
    for prefix, module in [
        ("oracle", model.algorithm.oracle),
        ("variance_encoders", model.algorithm.variance_encoders),
    ]:
        for key, tensor in module.state_dict().items():
            assert torch.equal(state[f"algorithm.{prefix}.{key}"], tensor.cpu())
    assert "algorithm.variance_encoders.4.raw_variance" in state
    assert len(trainer.optimizers[0].param_groups) == 2
