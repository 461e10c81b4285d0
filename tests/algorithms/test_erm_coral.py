from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genie_dg.algorithms import CORAL, ERM, DomainBatch, coral_distance
from genie_dg.errors import UserInputError


def test_coral_distance_of_identical_batches_is_zero():
    a = torch.randn(16, 5)
    assert coral_distance(a, a.clone()).item() == 0.0


def test_coral_distance_matches_hand_computation():
    a = np.array([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]])
    b = np.array([[0.0, 0.0], [2.0, 4.0], [1.0, 1.0]])
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).mean()
    cov_term = ((np.cov(a, rowvar=False) - np.cov(b, rowvar=False)) ** 2).mean()
    got = coral_distance(torch.tensor(a), torch.tensor(b)).item()
    assert got == pytest.approx(mean_term + cov_term)


def _batches(same: bool) -> list[DomainBatch]:
    torch.manual_seed(1)
    x = torch.randn(6, 3)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    other = x.clone() if same else x * 3 + 1
    return [DomainBatch(x, y, 0), DomainBatch(other, y, 1)]


def test_erm_is_cross_entropy_of_the_pooled_batches(make_network):
    net, batches = make_network(), _batches(same=False)
    expected = F.cross_entropy(net(torch.cat([b.x for b in batches])), torch.cat([b.y for b in batches]))
    loss = ERM(2, 2, 3).training_loss(net, batches).loss
    assert torch.allclose(loss, expected)


def test_coral_adds_gamma_times_the_mean_pairwise_penalty(make_network):
    net = make_network()
    same = CORAL(2, 2, 3, mmd_gamma=1.0).training_loss(net, _batches(same=True))
    assert same.metrics["coral_penalty"].item() == 0.0
    batches = _batches(same=False)
    out = CORAL(2, 2, 3, mmd_gamma=0.5).training_loss(net, batches)
    penalty = coral_distance(batches[0].x, batches[1].x)
    ce = (F.cross_entropy(net(batches[0].x), batches[0].y) + F.cross_entropy(net(batches[1].x), batches[1].y)) / 2
    assert torch.allclose(out.loss, ce + 0.5 * penalty)


def test_coral_refuses_a_single_training_domain_unless_allowed(make_network):
    with pytest.raises(UserInputError, match="at least 2 training domains.*allow_degenerate"):
        CORAL(2, 1, 3)
    with pytest.warns(UserWarning, match="penalty is inactive"):
        coral = CORAL(2, 1, 3, allow_degenerate=True)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    out = coral.training_loss(make_network(), [DomainBatch(x, y, 0)])
    assert out.metrics["coral_penalty"].item() == 0.0


def test_coral_rejects_negative_gamma():
    with pytest.raises(ValueError, match="mmd_gamma"):
        CORAL(2, 2, 3, mmd_gamma=-1.0)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_coral_trains_with_each_optimizer_and_counts_steps(train_algorithm, saved_state, optimizer):
    _, trainer = train_algorithm("coral", optimizer)
    state = saved_state(trainer)
    assert int(state["algorithm.update_count"]) == 3


def test_coral_genie_experiment_composes_coral_with_genie(make_config):
    cfg = make_config("experiment=coral_genie")
    assert cfg.algorithm._target_ == "genie_dg.algorithms.coral.CORAL"
    assert cfg.optimizer._target_ == "genie_dg.optim.GENIE"
