from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genie_dg.algorithms.base import DomainBatch
from genie_dg.algorithms.mixup import Mixup, domain_cycle
from genie_dg.errors import UserInputError


def _batches(sizes: tuple[int, ...] = (6, 6, 6)) -> list[DomainBatch]:
    torch.manual_seed(1)
    return [DomainBatch(torch.randn(n, 3) + 2 * d, torch.randint(0, 2, (n,)), d) for d, n in enumerate(sizes)]


def test_domain_cycle_pairs_each_domain_with_the_next():
    assert domain_cycle([2, 0, 3, 1]) == [(2, 0), (0, 3), (3, 1), (1, 2)]
    assert domain_cycle([0]) == [(0, 0)]


def test_mixup_loss_matches_hand_computation_with_the_steps_draws(make_network):
    net, batches = make_network(), _batches((6, 4, 5))
    mixup = Mixup(2, 3, 3, mixup_alpha=0.2)
    torch.manual_seed(5)
    plan = mixup.mixing_plan(3)
    assert sorted(i for i, _, _ in plan) == [0, 1, 2]
    assert all(0.0 <= lam <= 1.0 for _, _, lam in plan)
    expected = 0.0
    for i, j, lam in plan:
        n = min(len(batches[i].y), len(batches[j].y))
        logits = net(lam * batches[i].x[:n] + (1 - lam) * batches[j].x[:n])
        expected += lam * F.cross_entropy(logits, batches[i].y[:n])
        expected += (1 - lam) * F.cross_entropy(logits, batches[j].y[:n])
    assert torch.allclose(mixup.training_loss(net, batches).loss, expected / 3)


def test_mixup_draws_pairs_and_weights_once_per_step(make_network):
    net, batches = make_network(), _batches()
    mixup = Mixup(2, 3, 3, mixup_alpha=1.0)
    first = mixup.training_loss(net, batches).loss
    plan = mixup.mixing_plan(3)
    assert torch.equal(mixup.training_loss(net, batches).loss, first), "a re-evaluation must see the same mix"
    mixup.update_count += 1
    assert mixup.mixing_plan(3) != plan, "the next step draws afresh"


def test_mixup_with_a_single_domain_is_erm(make_network):
    with pytest.raises(UserInputError, match="at least 2 training domains.*allow_degenerate"):
        Mixup(2, 1, 3)
    with pytest.warns(UserWarning, match="penalty is inactive"):
        mixup = Mixup(2, 1, 3, allow_degenerate=True)
    net, [batch] = make_network(), _batches((6,))
    assert torch.allclose(mixup.training_loss(net, [batch]).loss, F.cross_entropy(net(batch.x), batch.y))


def test_mixup_rejects_a_non_positive_alpha():
    with pytest.raises(UserInputError, match="algorithm.mixup_alpha"):
        Mixup(2, 2, 3, mixup_alpha=0.0)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_mixup_trains_with_each_optimizer(train_algorithm, saved_state, optimizer):
    _, trainer = train_algorithm("mixup", optimizer)
    assert int(saved_state(trainer)["algorithm.update_count"]) == 3
