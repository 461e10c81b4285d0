"""The documented differences from the reference implementations (docs/fidelity.md), pinned:
each switch set to the reference's choice reproduces the reference's behaviour on a tiny
example, and each default does what the page says."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from genie_dg.algorithms import DomainBatch
from genie_dg.algorithms.arm import ARM
from genie_dg.algorithms.fishr import Fishr
from genie_dg.algorithms.irm import IRM
from genie_dg.algorithms.miro import MIRO
from genie_dg.algorithms.mixstyle import MixStyle
from genie_dg.algorithms.vrex import VREx
from genie_dg.conf import CONFIG_DIR
from genie_dg.models import Classifier, create_backbone
from genie_dg.models.timm_resnet import captured_outputs, stem_and_stages

CONF = CONFIG_DIR / "algorithm"


def _resnet(freeze_bn: bool = False, in_chans: int = 1) -> Classifier:
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", in_chans=in_chans, channels=[8, 16, 32, 64])
    return Classifier(backbone, num_classes=10, freeze_bn=freeze_bn)


def _image_batches(n_domains: int = 2, size: int = 4) -> list[DomainBatch]:
    torch.manual_seed(3)
    return [DomainBatch(torch.randn(size, 1, 28, 28) + d, torch.randint(0, 10, (size,)), d) for d in range(n_domains)]


def _running_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


# ARM: DomainBed never trains the context network (its optimizer is built before it exists).


def _arm_step(train_context_net: bool) -> tuple[ARM, Classifier, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    algorithm = ARM(10, 2, 64, input_shape=(1, 28, 28), train_context_net=train_context_net)
    net = _resnet()
    algorithm.setup_network(net)
    optimizer = algorithm.configure_optimizers(net, functools.partial(torch.optim.SGD, lr=0.1))
    before = {k: p.detach().clone() for k, p in algorithm.context_net.named_parameters()}
    optimizer.zero_grad()
    algorithm.training_loss(net, _image_batches()).loss.backward()
    optimizer.step()
    return algorithm, net, optimizer, before


def test_arm_default_leaves_the_context_net_untrained_as_domainbed():
    algorithm, net, optimizer, before = _arm_step(train_context_net=False)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    # DomainBed's ARM optimizer covers exactly the main network (featurizer with the widened conv, head).
    assert optimized == {id(p) for p in net.parameters()}
    assert all(torch.equal(before[k], p) for k, p in algorithm.context_net.named_parameters())
    # As in DomainBed, the context net still runs in training mode: its batch statistics move.
    assert algorithm.context_net[1].num_batches_tracked.item() == 1


def test_arm_train_context_net_trains_it_jointly():
    algorithm, net, optimizer, before = _arm_step(train_context_net=True)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in [*net.parameters(), *algorithm.context_net.parameters()]}
    assert not torch.equal(before["0.weight"], algorithm.context_net[0].weight)


# MIRO: the oracle normalises as the trained featurizer does.


def _miro(freeze_bn: bool) -> tuple[MIRO, Classifier, MIRO]:
    algorithm = MIRO(10, 2, 64, input_shape=(1, 28, 28), miro_lambda=0.5)
    net = _resnet(freeze_bn)
    algorithm.setup_network(net)
    return algorithm, net.train(), algorithm.train()


def _stage_outputs(featurizer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad(), captured_outputs(stem_and_stages(featurizer, "test")) as features:
        featurizer(x)
    return features


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_miro_identical_weights_cost_only_the_log_variance_in_training(freeze_bn):
    algorithm, net, _ = _miro(freeze_bn)
    oracle_statistics = _running_statistics(algorithm.oracle)
    out = algorithm.training_loss(net, _image_batches())
    # Five layers, the network's features equal to the oracle's, every variance at 0.1: the minimum.
    assert out.metrics["miro_penalty"].item() == pytest.approx(5 * math.log(0.1) / 2, rel=1e-5)
    after = algorithm.oracle.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in oracle_statistics.items()), "the oracle's statistics never move"
    norms = [m for m in algorithm.oracle.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training and m.track_running_stats for m in norms), "the oracle's flags are restored"


def test_miro_with_frozen_batch_norm_computes_the_references_penalty():
    algorithm, net, _ = _miro(freeze_bn=True)
    with torch.no_grad():
        net.featurizer.layer2[0].conv1.weight.mul_(1.5)
        algorithm.variance_encoders[1].raw_variance.fill_(0.3)
    batches = _image_batches()
    x = torch.cat([b.x for b in batches])
    out = algorithm.training_loss(net, batches)
    # khanrc/miro: both featurizers are URResNets, batch norm always on the stored statistics.
    reference_net, reference_oracle = copy.deepcopy(net.featurizer).eval(), copy.deepcopy(algorithm.oracle).eval()
    f, f0 = _stage_outputs(reference_net, x), _stage_outputs(reference_oracle, x)
    variances = [F.softplus(e.raw_variance) + 1e-5 for e in algorithm.variance_encoders]
    expected = sum(((a - b).pow(2) / v + v.log()).mean() / 2 for a, b, v in zip(f, f0, variances))
    assert out.metrics["miro_penalty"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_miro_without_frozen_batch_norm_compares_batch_normalised_features():
    algorithm, net, _ = _miro(freeze_bn=False)
    with torch.no_grad():
        net.featurizer.layer2[0].conv1.weight.mul_(1.5)
    batches = _image_batches()
    x = torch.cat([b.x for b in batches])
    trained, oracle = copy.deepcopy(net.featurizer).train(), copy.deepcopy(algorithm.oracle).train()
    out = algorithm.training_loss(net, batches)
    f, f0 = _stage_outputs(trained, x), _stage_outputs(oracle, x)
    expected = sum(((a - b).pow(2) / 0.1 + math.log(0.1)).mean() / 2 for a, b in zip(f, f0))
    assert out.metrics["miro_penalty"].item() == pytest.approx(expected.item(), rel=1e-4)


# MixStyle: the reference trains with frozen batch norm; here backbone.freeze_bn decides.


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_mixstyle_mixes_in_training_and_batch_norm_follows_freeze_bn(freeze_bn):
    net = _resnet(freeze_bn)
    plain = copy.deepcopy(net)
    MixStyle(10, 2, 64, mixstyle_p=1.0).setup_network(net)
    statistics = _running_statistics(net)
    net.train(), plain.train()
    torch.manual_seed(4)
    x = torch.randn(6, 1, 28, 28)
    assert not torch.allclose(net(x), plain(x)), "mixing is active in training"
    after = net.state_dict()
    unchanged = all(torch.equal(v, after[k]) for k, v in statistics.items())
    norms = [m for m in net.featurizer.modules() if isinstance(m, nn.BatchNorm2d)]
    if freeze_bn:  # the reference: every layer on the stored statistics, which stay as they were
        assert unchanged and not any(m.training for m in norms)
    else:
        assert not unchanged and all(m.training for m in norms)


# IRM, VREx, Fishr: DomainBed rebuilds Adam when the penalty switches on; so does the default here.


def _linear_network() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _tabular_batches() -> list[DomainBatch]:
    torch.manual_seed(1)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    return [DomainBatch(torch.randn(6, 3) * (d + 1) + d, y, d) for d in range(2)]


class _Network(nn.Module):
    """A linear classifier with the ``features``/``head`` split the methods use."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.head = linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def _project_trajectory(algorithm, steps: int) -> torch.Tensor:
    """The module's order: loss (which may ask for a reset), reset, backward, step."""
    network = _Network(_linear_network())
    optimizer = torch.optim.Adam(network.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        out = algorithm.training_loss(network, _tabular_batches())
        if out.reset_optimizer:
            optimizer.state.clear()
        out.loss.backward()
        optimizer.step()
        algorithm.update_count += 1
    return network.head.weight.detach().clone()


def _domainbed_irm_trajectory(penalty_lambda: float, anneal_iters: int, steps: int) -> torch.Tensor:
    """DomainBed's IRM.update: the penalty by autograd through a dummy scale, Adam rebuilt at
    ``update_count == irm_penalty_anneal_iters``."""
    network = _linear_network()
    optimizer = torch.optim.Adam(network.parameters(), lr=0.05)
    for step in range(steps):
        weight = penalty_lambda if step >= anneal_iters else 1.0
        nll, penalty = 0.0, 0.0
        for batch in _tabular_batches():
            logits = network(batch.x)
            nll = nll + F.cross_entropy(logits, batch.y)
            scale = torch.tensor(1.0, requires_grad=True)
            halves = [F.cross_entropy(logits[i::2] * scale, batch.y[i::2]) for i in (0, 1)]
            grads = [torch.autograd.grad(h, [scale], create_graph=True)[0] for h in halves]
            penalty = penalty + grads[0] * grads[1]
        loss = nll / 2 + weight * penalty / 2
        if step == anneal_iters:
            optimizer = torch.optim.Adam(network.parameters(), lr=0.05)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.weight.detach().clone()


def test_irm_default_rebuilds_adam_at_the_anneal_step_as_domainbed():
    reference = _domainbed_irm_trajectory(100.0, anneal_iters=2, steps=4)
    default = _project_trajectory(IRM(2, 2, 3, irm_lambda=100.0, irm_penalty_anneal_iters=2), steps=4)
    assert torch.allclose(default, reference, atol=1e-6)
    kept = IRM(2, 2, 3, irm_lambda=100.0, irm_penalty_anneal_iters=2, reset_optimizer_on_anneal=False)
    assert not torch.allclose(_project_trajectory(kept, steps=4), reference, atol=1e-4)


@pytest.mark.parametrize(
    ("method", "anneal_step"),
    [
        (functools.partial(VREx, 2, 2, 3, vrex_penalty_anneal_iters=2), 2),
        (functools.partial(Fishr, 2, 2, 3, fishr_penalty_anneal_iters=2), 2),
        (functools.partial(IRM, 2, 2, 3, irm_penalty_anneal_iters=0), 0),
        (functools.partial(Fishr, 2, 2, 3, fishr_penalty_anneal_iters=0), None),  # DomainBed: `!= 0`
    ],
)
def test_penalty_methods_ask_for_a_reset_at_domainbeds_step_by_default(method, anneal_step):
    algorithm, network = method(), _Network(_linear_network())
    resets = []
    for step in range(4):
        algorithm.update_count.fill_(step)
        if algorithm.training_loss(network, _tabular_batches()).reset_optimizer:
            resets.append(step)
    assert resets == ([] if anneal_step is None else [anneal_step])
    assert not method(reset_optimizer_on_anneal=False).reset_optimizer_on_anneal


# The configs set the switches to the defaults the page documents.


@pytest.mark.parametrize(
    ("config", "switch", "value"),
    [
        ("arm", "train_context_net", False),
        ("irm", "reset_optimizer_on_anneal", True),
        ("vrex", "reset_optimizer_on_anneal", True),
        ("fishr", "reset_optimizer_on_anneal", True),
    ],
)
def test_config_defaults_are_the_documented_ones(config, switch, value):
    assert OmegaConf.load(CONF / f"{config}.yaml")[switch] is value
