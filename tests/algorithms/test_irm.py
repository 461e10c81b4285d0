from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genie_dg.algorithms.base import DomainBatch
from genie_dg.algorithms.irm import IRM, irm_penalty, scale_gradient
from genie_dg.errors import UserInputError


def _batches(num_domains: int = 2, size: int = 6) -> list[DomainBatch]:
    torch.manual_seed(1)
    return [DomainBatch(torch.randn(size, 3) * (d + 1), torch.randint(0, 3, (size,)), d) for d in range(num_domains)]


def _autograd_scale_gradient(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    scale = torch.tensor(1.0, dtype=logits.dtype, requires_grad=True)
    return torch.autograd.grad(F.cross_entropy(logits * scale, y), scale)[0]


def test_scale_gradient_equals_autograd_through_a_dummy_scale():
    torch.manual_seed(2)
    logits, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 4, (7,))
    assert torch.allclose(scale_gradient(logits, y), _autograd_scale_gradient(logits, y))


def test_irm_penalty_matches_hand_computation():
    # Two classes, logits (a, 0): d/ds CE = -a * sigmoid(-a) for label 0 and a * sigmoid(a) for label 1.
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    even = (-2.0 * sigmoid(-2.0) + 1.0 * sigmoid(1.0)) / 2  # samples 0 and 2
    odd = (1.0 * sigmoid(1.0) + 3.0 * sigmoid(3.0)) / 2  # samples 1 and 3
    assert irm_penalty(logits, y).item() == pytest.approx(even * odd)


def test_irm_penalty_vanishes_for_a_perfectly_scaled_classifier():
    torch.manual_seed(3)
    half_logits, half_y = torch.randn(5, 3, dtype=torch.float64) * 2, torch.randint(0, 3, (5,))
    # Both halves hold the same samples, so the penalty is the squared scale gradient.
    logits, y = half_logits.repeat_interleave(2, 0), half_y.repeat_interleave(2)
    assert irm_penalty(logits, y).item() > 1e-4
    # Bisection for the scale s* where d/ds CE(s * logits) = 0 (the loss is convex in s).
    low, high = 1e-3, 1e3
    for _ in range(200):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if scale_gradient(half_logits * mid, half_y) < 0 else (low, mid)
    assert irm_penalty(logits * low, y).item() == pytest.approx(0.0, abs=1e-12)


def test_irm_loss_is_mean_domain_loss_plus_weighted_penalty_and_anneals_at_the_configured_step(make_network):
    net, batches = make_network(3), _batches()
    irm = IRM(3, 2, 3, irm_lambda=100.0, irm_penalty_anneal_iters=2, reset_optimizer_on_anneal=True)
    ce = torch.stack([F.cross_entropy(net(b.x), b.y) for b in batches]).mean()
    penalty = torch.stack([irm_penalty(net(b.x), b.y) for b in batches]).mean()
    expected_weights = {0: 1.0, 1: 1.0, 2: 100.0, 3: 100.0}
    for step, weight in expected_weights.items():
        irm.update_count.fill_(step)
        out = irm.training_loss(net, batches)
        assert torch.allclose(out.loss, ce + weight * penalty), step
        assert out.metrics["irm_penalty_weight"].item() == weight
        assert out.reset_optimizer == (step == 2), step
    irm.update_count.fill_(2)
    assert not irm.training_loss(net, batches).reset_optimizer, "a re-evaluation in the same step must not reset"


def test_irm_keeps_the_optimizer_state_when_asked(make_network):
    irm = IRM(3, 2, 3, irm_penalty_anneal_iters=0, reset_optimizer_on_anneal=False)
    assert not irm.training_loss(make_network(3), _batches()).reset_optimizer


def test_irm_annealing_clears_adam_state_during_training(train_algorithm):
    # The default (reset_optimizer_on_anneal=true) resets, as DomainBed does.
    model, trainer = train_algorithm("irm", "adam", "algorithm.irm_penalty_anneal_iters=1")
    # Adam's state was cleared before the update of step 1, so it has counted steps 1 and 2 only.
    state = trainer.optimizers[0].state[model.network.head.weight]
    assert int(state["step"]) == 2


def test_irm_refuses_a_single_training_domain_unless_allowed(make_network):
    with pytest.raises(UserInputError, match="at least 2 training domains.*allow_degenerate"):
        IRM(3, 1, 3)
    with pytest.warns(UserWarning, match="penalty is inactive"):
        irm = IRM(3, 1, 3, allow_degenerate=True)
    net, [batch] = make_network(3), _batches(1)
    out = irm.training_loss(net, [batch])
    assert torch.allclose(out.loss, F.cross_entropy(net(batch.x), batch.y))
    assert out.metrics["irm_penalty"].item() != 0.0


def test_irm_needs_two_samples_per_domain(make_network):
    with pytest.raises(UserInputError, match="dataset.batch_size"):
        IRM(3, 2, 3).training_loss(make_network(3), _batches(size=1))


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"irm_lambda": -1.0}, "irm_lambda"),
        ({"irm_penalty_anneal_iters": 2.5}, "irm_penalty_anneal_iters"),
        ({"reset_optimizer_on_anneal": "yes"}, "reset_optimizer_on_anneal"),
    ],
)
def test_irm_rejects_invalid_hyperparameters(override, name):
    with pytest.raises(UserInputError, match=f"algorithm.{name}"):
        IRM(3, 2, 3, **override)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_irm_trains_with_each_optimizer(train_algorithm, saved_state, optimizer):
    _, trainer = train_algorithm("irm", optimizer)
    assert trainer.callback_metrics["train/irm_penalty_weight"] == 1.0
    assert int(saved_state(trainer)["algorithm.update_count"]) == 3
