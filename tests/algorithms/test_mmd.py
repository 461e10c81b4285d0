from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genie_dg.algorithms.base import DomainBatch
from genie_dg.algorithms.mmd import KERNEL_GAMMAS, MMD, gaussian_mmd
from genie_dg.errors import UserInputError


def _kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
    return np.mean([sum(np.exp(-g * np.sum((u - v) ** 2)) for g in KERNEL_GAMMAS) for u in a for v in b])


def test_gaussian_mmd_matches_hand_computation():
    a = np.array([[0.0, 1.0], [0.5, -0.5], [1.0, 0.0]])
    b = np.array([[0.2, 0.1], [-1.0, 0.3]])
    expected = _kernel_mean(a, a) + _kernel_mean(b, b) - 2 * _kernel_mean(a, b)
    got = gaussian_mmd(torch.tensor(a), torch.tensor(b)).item()
    assert got == pytest.approx(expected, rel=1e-9)
    assert got > 0


def test_gaussian_mmd_of_identical_batches_is_zero():
    a = torch.randn(8, 4, dtype=torch.float64)
    assert gaussian_mmd(a, a.clone()).item() == pytest.approx(0.0, abs=1e-12)


def _batches(num_domains: int) -> list[DomainBatch]:
    torch.manual_seed(1)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    return [DomainBatch(torch.randn(6, 3) * (d + 1) + d, y, d) for d in range(num_domains)]


def test_mmd_adds_gamma_times_the_mean_over_all_domain_pairs(make_network):
    net, batches = make_network(), _batches(3)
    out = MMD(2, 3, 3, mmd_gamma=0.5).training_loss(net, batches)
    penalty = torch.stack([gaussian_mmd(a.x, b.x) for a, b in itertools.combinations(batches, 2)]).mean()
    ce = torch.stack([F.cross_entropy(net(b.x), b.y) for b in batches]).mean()
    assert torch.allclose(out.metrics["mmd_penalty"], penalty)
    assert torch.allclose(out.loss, ce + 0.5 * penalty)
    out.loss.backward()
    assert net.head.weight.grad.abs().sum() > 0


def test_mmd_refuses_a_single_training_domain_unless_allowed(make_network):
    with pytest.raises(UserInputError, match="at least 2 training domains.*allow_degenerate"):
        MMD(2, 1, 3)
    with pytest.warns(UserWarning, match="penalty is inactive"):
        mmd = MMD(2, 1, 3, allow_degenerate=True)
    net, [batch] = make_network(), _batches(1)
    out = mmd.training_loss(net, [batch])
    assert out.metrics["mmd_penalty"].item() == 0.0
    assert torch.allclose(out.loss, F.cross_entropy(net(batch.x), batch.y))


def test_mmd_rejects_negative_gamma():
    with pytest.raises(UserInputError, match="algorithm.mmd_gamma"):
        MMD(2, 2, 3, mmd_gamma=-1.0)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_mmd_trains_with_each_optimizer(train_algorithm, saved_state, optimizer):
    model, trainer = train_algorithm("mmd", optimizer)
    assert isinstance(model.algorithm, MMD)
    assert trainer.callback_metrics["train/mmd_penalty"] > 0
    assert int(saved_state(trainer)["algorithm.update_count"]) == 3
