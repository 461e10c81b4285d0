from __future__ import annotations

import functools

import pytest
import pytorch_optimizer
import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms import DomainBatch
from genie_dg.algorithms.base import build_inner_optimizer
from genie_dg.algorithms.mldg import MLDG, meta_train_test_pairs
from genie_dg.errors import UserInputError
from genie_dg.optim import GENIE


def _sgd(lr: float):
    return functools.partial(torch.optim.SGD, lr=lr)


def test_meta_pairs_follow_domainbeds_split():
    sizes = [5, 3, 4, 6]
    batches = [DomainBatch(torch.randn(n, 2), torch.arange(n), d) for d, n in enumerate(sizes)]
    torch.manual_seed(7)
    order = torch.randperm(4).tolist()
    torch.manual_seed(7)
    pairs = meta_train_test_pairs(batches, n_meta_test=2)
    meta_train, meta_test = order[:2], order[2:]
    assert [(a.domain, b.domain) for a, b in pairs] == list(zip(meta_train, meta_test))
    for a, b in pairs:
        n = min(sizes[a.domain], sizes[b.domain])
        assert len(a.y) == len(b.y) == n
        assert torch.equal(a.x, batches[a.domain].x[:n]) and torch.equal(b.x, batches[b.domain].x[:n])
    torch.manual_seed(7)
    cycled = meta_train_test_pairs(batches, n_meta_test=1)
    assert [(a.domain, b.domain) for a, b in cycled] == [(i, order[3]) for i in order[:3]]


def test_mldg_step_applies_meta_train_plus_beta_meta_test_gradient(
    make_network, make_batches, manual_module, linear_gradient
):
    network, batches = make_network(), make_batches()
    lr, beta = 0.5, 0.3
    mldg = MLDG(2, 2, 3, mldg_beta=beta, n_meta_test=1)
    module = manual_module(network, mldg.configure_optimizers(network, _sgd(lr)))
    w, b = network.head.weight.detach().clone(), network.head.bias.detach().clone()
    torch.manual_seed(5)
    i, j = torch.randperm(2).tolist()
    torch.manual_seed(5)
    out = mldg.manual_step(module.context, batches)
    gw_i, gb_i = linear_gradient(w, b, batches[i].x, batches[i].y)
    gw_j, gb_j = linear_gradient(w - lr * gw_i, b - lr * gb_i, batches[j].x, batches[j].y)
    # One pair over two domains: the gradient is (G_i + beta * G_j) / 2.
    assert torch.allclose(network.head.weight, w - lr * (gw_i + beta * gw_j) / 2, atol=1e-6)
    assert torch.allclose(network.head.bias, b - lr * (gb_i + beta * gb_j) / 2, atol=1e-6)
    assert module.steps == 1
    loss_i = F.cross_entropy(batches[i].x @ w.T + b, batches[i].y)
    loss_j = F.cross_entropy(batches[j].x @ (w - lr * gw_i).T + (b - lr * gb_i), batches[j].y)
    assert torch.allclose(out.loss, (loss_i + beta * loss_j) / 2, atol=1e-6)


def test_mldg_copies_the_batch_norm_statistics_the_inner_network_gathers(make_network, make_batches, manual_module):
    bn = nn.BatchNorm1d(3)
    network, batches = make_network(featurizer=bn), make_batches(n_domains=3)
    mldg = MLDG(2, 3, 3, n_meta_test=1)
    module = manual_module(network, mldg.configure_optimizers(network, _sgd(0.1)))
    mldg.manual_step(module.context, batches)
    # Two pairs, each a forward on the meta-train then on the meta-test minibatch.
    assert int(bn.num_batches_tracked) == 4
    assert not torch.equal(bn.running_mean, torch.zeros(3))


def test_mldg_needs_a_meta_train_domain():
    with pytest.raises(UserInputError, match=r"algorithm.n_meta_test.*\[1, 1\]"):
        MLDG(2, 2, 3, n_meta_test=2)
    with pytest.raises(UserInputError, match="algorithm.mldg_beta"):
        MLDG(2, 3, 3, mldg_beta=-1.0)
    assert MLDG(2, 3, 3, n_meta_test=2).n_meta_test == 2


def test_mldg_refuses_a_single_training_domain_unless_allowed_then_steps_as_erm(
    make_network, make_batches, manual_module, linear_gradient
):
    with pytest.raises(UserInputError, match="at least 2 training domains.*allow_degenerate"):
        MLDG(2, 1, 3)
    with pytest.warns(UserWarning, match="penalty is inactive"):
        mldg = MLDG(2, 1, 3, allow_degenerate=True)
    network, batches = make_network(), make_batches(n_domains=1)
    module = manual_module(network, mldg.configure_optimizers(network, _sgd(0.5)))
    w, b = network.head.weight.detach().clone(), network.head.bias.detach().clone()
    mldg.manual_step(module.context, batches)
    gw, gb = linear_gradient(w, b, batches[0].x, batches[0].y)
    assert torch.allclose(network.head.weight, w - 0.5 * gw, atol=1e-6)
    assert torch.allclose(network.head.bias, b - 0.5 * gb, atol=1e-6)


def test_inner_genie_optimizers_get_fresh_seeds():
    params = [nn.Parameter(torch.zeros(2))]
    genie = functools.partial(GENIE, lr=0.1, seed=0)
    seeds = {build_inner_optimizer(genie, params).seed for _ in range(3)}
    assert len(seeds) == 3 and 0 not in seeds
    adam = build_inner_optimizer(functools.partial(torch.optim.Adam, lr=0.1), params)
    assert isinstance(adam, torch.optim.Adam)


@pytest.mark.parametrize("optimizer", ["genie", "adam"])
def test_mldg_trains_with_each_optimizer(train_algorithm, saved_state, optimizer):
    model, trainer = train_algorithm("mldg", optimizer)
    state = saved_state(trainer)
    assert int(state["algorithm.update_count"]) == 3
    assert not any(k.startswith("algorithm.") and k != "algorithm.update_count" for k in state)
    bn = model.network.featurizer.bn1
    assert int(bn.num_batches_tracked) > 0, "the network's batch-norm statistics follow the copies'"


def test_mldg_refuses_optimizers_that_differentiate_the_gradient(make_network):
    adahessian = functools.partial(pytorch_optimizer.AdaHessian, lr=0.1)
    with pytest.raises(UserInputError, match="AdaHessian has no Hessian"):
        MLDG(2, 3, 3).configure_optimizers(make_network(), adahessian)
