from __future__ import annotations

import functools

import pytest
import pytorch_optimizer
import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.fish import Fish
from genie_dg.errors import UserInputError


@pytest.fixture
def make_fish(manual_module):
    """``make_fish(network, optimizer_factory, n_domains=2, meta_lr=0.5)``: Fish and the module
    standing in for the LightningModule, with Fish's optimizers over ``network``."""

    def make(network, factory, n_domains=2, meta_lr=0.5):
        fish = Fish(2, n_domains, 3, meta_lr=meta_lr)
        return fish, manual_module(network, fish.configure_optimizers(network, factory))

    return make


def test_fish_with_plain_sgd_moves_meta_lr_of_the_way_to_the_inner_loops_weights(
    make_network, make_batches, linear_gradient, make_fish
):
    network, batches = make_network(), make_batches(n_domains=3)
    lr, meta_lr = 0.4, 0.3
    fish, module = make_fish(network, functools.partial(torch.optim.SGD, lr=lr), n_domains=3, meta_lr=meta_lr)
    w, b = network.head.weight.detach().clone(), network.head.bias.detach().clone()
    inner_w, inner_b = w.clone(), b.clone()
    for batch in batches:  # one SGD step per domain, in order
        gw, gb = linear_gradient(inner_w, inner_b, batch.x, batch.y)
        inner_w, inner_b = inner_w - lr * gw, inner_b - lr * gb
    fish.manual_step(module.context, batches)
    assert module.steps == 1
    assert torch.allclose(network.head.weight, w + meta_lr * (inner_w - w), atol=1e-6)
    assert torch.allclose(network.head.bias, b + meta_lr * (inner_b - b), atol=1e-6)


def test_fish_outer_optimizer_has_no_weight_decay_and_the_inner_one_keeps_it(make_network, make_batches, make_fish):
    network = make_network()
    fish, module = make_fish(network, functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.01))
    assert module.context.optimizer.param_groups[0]["weight_decay"] == 0.0
    fish.manual_step(module.context, make_batches())
    _, inner_optimizer = fish._inner_loop(network)
    assert inner_optimizer.param_groups[0]["weight_decay"] == 0.01


def test_fish_inner_optimizer_keeps_its_state_across_steps_and_through_a_checkpoint(
    make_network, make_batches, make_fish
):
    network, batches = make_network(), make_batches(n_domains=3)
    adam = functools.partial(torch.optim.Adam, lr=0.01)
    fish, module = make_fish(network, adam, n_domains=3)
    for _ in range(2):
        fish.manual_step(module.context, batches)
    _, inner_optimizer = fish._inner_loop(network)
    steps = [int(s["step"]) for s in inner_optimizer.state.values()]
    assert steps == [6, 6], "two training steps of three domains each"
    state = fish.state_dict()
    resumed, resumed_module = make_fish(make_network(), adam, n_domains=3)
    resumed.load_state_dict(state)
    resumed.manual_step(resumed_module.context, batches)
    _, resumed_inner = resumed._inner_loop(resumed_module.network)
    assert [int(s["step"]) for s in resumed_inner.state.values()] == [9, 9]


def test_fish_moves_float_buffers_meta_lr_of_the_way_and_copies_counters(make_network, make_batches, make_fish):
    bn = nn.BatchNorm1d(3)
    network, batches = make_network(featurizer=bn), make_batches()
    fish, module = make_fish(network, functools.partial(torch.optim.SGD, lr=0.1), meta_lr=0.5)
    fish.manual_step(module.context, batches)
    # The copy's running mean after its two forwards (momentum 0.1, starting at 0).
    inner_mean = 0.9 * (0.1 * batches[0].x.mean(0)) + 0.1 * batches[1].x.mean(0)
    assert torch.allclose(bn.running_mean, 0.5 * inner_mean, atol=1e-6)
    assert int(bn.num_batches_tracked) == 2


def test_fish_rejects_bad_settings(make_network):
    with pytest.raises(UserInputError, match="algorithm.meta_lr"):
        Fish(2, 2, 3, meta_lr=0.0)
    with pytest.raises(UserInputError, match="optimizer.lr > 0"):
        Fish(2, 2, 3).configure_optimizers(make_network(), functools.partial(torch.optim.SGD, lr=0.0))
    adahessian = functools.partial(pytorch_optimizer.AdaHessian, lr=0.1)
    with pytest.raises(UserInputError, match="AdaHessian has no Hessian"):
        Fish(2, 2, 3).configure_optimizers(make_network(), adahessian)


def test_fish_refuses_a_single_training_domain_unless_allowed(make_network, make_batches, manual_module):
    with pytest.raises(UserInputError, match="at least 2 training domains.*allow_degenerate"):
        Fish(2, 1, 3)
    with pytest.warns(UserWarning, match="penalty is inactive"):
        fish = Fish(2, 1, 3, allow_degenerate=True)
    network, batches = make_network(), make_batches(n_domains=1)
    sgd = functools.partial(torch.optim.SGD, lr=0.5)
    module = manual_module(network, fish.configure_optimizers(network, sgd))
    before = F.cross_entropy(network(batches[0].x), batches[0].y)
    out = fish.manual_step(module.context, batches)
    assert torch.allclose(out.loss, before)
    assert F.cross_entropy(network(batches[0].x), batches[0].y) < before


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_fish_trains_with_each_optimizer_and_checkpoints_its_inner_optimizer(train_algorithm, saved_state, optimizer):
    model, trainer = train_algorithm("fish", optimizer)
    inner_state = saved_state(trainer)["algorithm._extra_state"]["inner_optimizer"]["state"]
    # Three training steps over five training domains.
    assert {int(s["step"]) for s in inner_state.values()} == {15}
