from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genie_dg.algorithms.base import DomainBatch
from genie_dg.algorithms.vrex import VREx, risk_variance
from genie_dg.errors import UserInputError


def _batches(num_domains: int = 3, same: bool = False) -> list[DomainBatch]:
    torch.manual_seed(1)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    return [DomainBatch(x.clone() if same else x * (d + 1) + d, y, d) for d in range(num_domains)]


def test_risk_variance_matches_hand_computation():
    # Risks 1, 2, 6: mean 3, squared deviations 4, 1, 9.
    assert risk_variance(torch.tensor([1.0, 2.0, 6.0])).item() == pytest.approx(14 / 3)


def test_vrex_penalty_of_equal_domain_losses_is_zero(make_network):
    out = VREx(2, 3, 3).training_loss(make_network(), _batches(same=True))
    assert out.metrics["vrex_penalty"].item() == 0.0


def test_vrex_loss_is_mean_risk_plus_weighted_variance_and_anneals_at_the_configured_step(make_network):
    net, batches = make_network(), _batches()
    vrex = VREx(2, 3, 3, vrex_lambda=10.0, vrex_penalty_anneal_iters=3, reset_optimizer_on_anneal=True)
    risks = torch.stack([F.cross_entropy(net(b.x), b.y) for b in batches])
    variance = ((risks - risks.mean()) ** 2).mean()
    assert variance > 0
    for step, weight in {0: 1.0, 2: 1.0, 3: 10.0, 7: 10.0}.items():
        vrex.update_count.fill_(step)
        out = vrex.training_loss(net, batches)
        assert torch.allclose(out.loss, risks.mean() + weight * variance), step
        assert out.metrics["vrex_penalty_weight"].item() == weight
        assert out.reset_optimizer == (step == 3), step


def test_vrex_refuses_a_single_training_domain_unless_allowed(make_network):
    with pytest.raises(UserInputError, match="at least 2 training domains.*allow_degenerate"):
        VREx(2, 1, 3)
    with pytest.warns(UserWarning, match="penalty is inactive"):
        vrex = VREx(2, 1, 3, allow_degenerate=True)
    net, [batch] = make_network(), _batches(1)
    out = vrex.training_loss(net, [batch])
    assert torch.allclose(out.loss, F.cross_entropy(net(batch.x), batch.y))


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"vrex_lambda": -0.1}, "vrex_lambda"),
        ({"vrex_penalty_anneal_iters": -1}, "vrex_penalty_anneal_iters"),
    ],
)
def test_vrex_rejects_invalid_hyperparameters(override, name):
    with pytest.raises(UserInputError, match=f"algorithm.{name}"):
        VREx(2, 2, 3, **override)


def test_vrex_annealing_clears_adam_state_during_training(train_algorithm):
    # The default (reset_optimizer_on_anneal=true) resets, as DomainBed does.
    model, trainer = train_algorithm("vrex", "adam", "algorithm.vrex_penalty_anneal_iters=2")
    assert trainer.callback_metrics["train/vrex_penalty_weight"] == 10.0
    state = trainer.optimizers[0].state[model.network.head.weight]
    assert int(state["step"]) == 1, "state cleared before the update of step 2"


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_vrex_trains_with_each_optimizer(train_algorithm, saved_state, optimizer):
    _, trainer = train_algorithm("vrex", optimizer)
    assert trainer.callback_metrics["train/vrex_penalty"] > 0
    assert int(saved_state(trainer)["algorithm.update_count"]) == 3
