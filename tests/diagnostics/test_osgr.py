"""OSGR: the measured ratio of Eq. 1, and its estimate from per-unit gradient statistics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.diagnostics.osgr import (
    estimated_osgr,
    gradient_statistics,
    measure_one_step_decrease,
    preconditioners,
)
from genie_dg.optim import GENIE

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "genie": lambda p: GENIE(p, lr=0.1, seed=3),
}


def _network() -> nn.Module:
    # BatchNorm (buffers that a forward pass changes) and dropout (global random draws):
    # both must be left as they were by a measurement.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def _batch(seed: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def _backward(network: nn.Module, batch) -> None:
    network.zero_grad()
    F.cross_entropy(network(batch[0]), batch[1]).backward()


def _trained(name: str, steps: int = 3):
    network = _network()
    optimizer = OPTIMIZERS[name](network.parameters())
    for step in range(steps):
        _backward(network, _batch(step))
        optimizer.step()
    _backward(network, _batch(100))
    return network, optimizer


def _snapshot(network: nn.Module, optimizer: torch.optim.Optimizer):
    return (
        [t.clone() for t in network.state_dict().values()],
        [p.grad.clone() for p in network.parameters()],
        copy.deepcopy(optimizer.state_dict()),
        torch.get_rng_state(),
    )


def _assert_same(a, b) -> None:
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)
    assert torch.equal(a[3], b[3]), "the global random generator moved"
    _assert_same_optimizer_state(a[2], b[2])


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        for key, value in state.items():
            other = b["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    for key in a.get("generator_states", {}):
        assert torch.equal(a["generator_states"][key], b["generator_states"][key])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_identical_train_and_heldout_batch_give_a_measured_osgr_of_one(name):
    network, optimizer = _trained(name)
    batch = _batch(100)
    before = _snapshot(network, optimizer)
    decrease = measure_one_step_decrease(network, optimizer, batch, {"same": batch})
    assert decrease.train > 0, "the step must lower the loss of the batch it was computed on"
    assert decrease.osgr("same") == 1.0
    _assert_same(before, _snapshot(network, optimizer))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_measured_step_leaves_the_real_step_bitwise_unchanged(name):
    measured, measured_optimizer = _trained(name)
    plain, plain_optimizer = _trained(name)
    decrease = measure_one_step_decrease(measured, measured_optimizer, _batch(100), {"other": _batch(7)})
    assert decrease.osgr("other") != 1.0
    for network, optimizer in ((measured, measured_optimizer), (plain, plain_optimizer)):
        torch.manual_seed(11)  # the same dropout masks for both continuations
        optimizer.step()
        _backward(network, _batch(101))
        optimizer.step()
    for a, b in zip(measured.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    _assert_same_optimizer_state(measured_optimizer.state_dict(), plain_optimizer.state_dict())


def test_single_parameter_estimated_osgr_matches_the_formula_by_hand():
    x = torch.tensor([[0.5], [1.0], [-2.0], [1.5], [0.3], [2.5]], dtype=torch.float64)
    y = torch.tensor([[1.0], [0.0], [-3.0], [2.0], [1.0], [2.0]], dtype=torch.float64)
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.4)
    # Per-sample gradient of (w x - y)^2: 2 x (w x - y).
    g = 2 * x.numpy()[:, 0] * (0.4 * x.numpy()[:, 0] - y.numpy()[:, 0])
    n = len(g)
    mean, var = g.mean(), g.var(ddof=1)
    r = mean**2 / var - 1 / n
    weight = 1.0  # one parameter: W = p E[g^2] / (p E[g^2])
    by_hand = 1 - (1 / n) * weight / (r + 1 / n)

    # Chunks of 4 units: the running statistics are merged across two chunks.
    stats = gradient_statistics(model, dict(model.named_parameters()), x, y, loss_fn=F.mse_loss, units_per_chunk=4)
    assert stats.units == n
    assert float(stats.mean["weight"]) == pytest.approx(mean, rel=1e-12)
    assert float(stats.variance["weight"]) == pytest.approx(var, rel=1e-12)
    assert float(stats.gsnr()["weight"]) == pytest.approx(r, rel=1e-12)
    assert estimated_osgr(stats, {"weight": None}) == pytest.approx(by_hand, rel=1e-12)
    # Any preconditioner cancels out with a single parameter.
    assert estimated_osgr(stats, {"weight": torch.full((1, 1), 3.0, dtype=torch.float64)}) == pytest.approx(by_hand)


def test_estimated_osgr_weights_coordinates_by_preconditioned_gradient_energy():
    torch.manual_seed(1)
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    stats = gradient_statistics(model, dict(model.named_parameters()), x, y, loss_fn=F.mse_loss, samples_per_unit=2)
    assert stats.units == 8
    # The units' mean gradient is the batch gradient.
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    assert torch.allclose(stats.mean["weight"], model.weight.grad)

    p = {"weight": torch.tensor([[2.0, 0.5, 1.0]], dtype=torch.float64), "bias": None}
    mean = np.concatenate([stats.mean["weight"].numpy().ravel(), stats.mean["bias"].numpy().ravel()])
    var = np.concatenate([stats.variance["weight"].numpy().ravel(), stats.variance["bias"].numpy().ravel()])
    weights = np.array([2.0, 0.5, 1.0, 1.0])
    n = 8
    energy = weights * mean**2
    w = energy / energy.sum()
    r = mean**2 / var - 1 / n
    paper_form = 1 - (1 / n) * np.sum(w / (r + 1 / n))
    assert estimated_osgr(stats, p) == pytest.approx(paper_form, rel=1e-10)
    assert estimated_osgr(stats, p) != pytest.approx(estimated_osgr(stats, {}), rel=1e-3)


def test_micro_batch_gradients_with_batchnorm_match_autograd_and_leave_the_running_statistics_alone():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = _batch(5, n=24)
    buffers = [b.clone() for b in network.buffers()]
    stats = gradient_statistics(network, dict(network.named_parameters()), x, y, samples_per_unit=4, units_per_chunk=4)
    for before, after in zip(buffers, network.buffers()):
        assert torch.equal(before, after)
    # The same unit gradients by ordinary autograd, one micro-batch (and its statistics) at a time.
    by_loop = []
    for xs, ys in zip(x.split(4), y.split(4)):
        network.zero_grad()
        F.cross_entropy(network(xs), ys).backward()
        by_loop.append(network[0].weight.grad.clone())
    loop = torch.stack(by_loop)
    assert stats.units == 6
    assert torch.allclose(stats.mean["0.weight"], loop.mean(0), atol=1e-6)
    assert torch.allclose(stats.variance["0.weight"], loop.var(0), atol=1e-6)


def test_gradient_statistics_needs_two_units():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="at least 2"):
        gradient_statistics(
            model, dict(model.named_parameters()), torch.randn(3, 2), torch.randn(3, 1), samples_per_unit=2
        )


def test_preconditioners_of_sgd_adam_and_genie():
    params = {name: nn.Parameter(torch.tensor([0.5, -1.0, 2.0])) for name in ("sgd", "adam", "genie", "frozen")}
    sgd = torch.optim.SGD([params["sgd"]], lr=0.1)
    adam = torch.optim.Adam([params["adam"]], lr=0.1, eps=1e-8)
    genie = GENIE([params["genie"]], lr=0.1, seed=0)
    optimizers = [sgd, adam, genie]
    assert all(p is None for name, p in preconditioners(optimizers, params).items() if name != "frozen")
    gradients = [torch.tensor([0.3, -0.2, 0.1]), torch.tensor([0.25, 0.1, 0.05]), torch.tensor([0.35, -0.3, 0.2])]
    for g in gradients:
        for p in params.values():
            p.grad = g.clone()
        for optimizer in optimizers:
            optimizer.step()
    found = preconditioners(optimizers, params)
    assert found["sgd"] is None
    assert torch.equal(found["frozen"], torch.zeros(3)), "a parameter no optimizer holds never moves"
    # Adam: 1 / (sqrt(v / (1 - beta2^t)) + eps), v the running average of g^2.
    v = torch.zeros(3)
    for g in gradients:
        v = 0.999 * v + 0.001 * g**2
    assert torch.allclose(found["adam"], 1 / ((v / (1 - 0.999**3)).sqrt() + 1e-8))
    # GENIE: psi * lam, whose mean GENIE.statistics reports.
    assert float(found["genie"].mean()) == pytest.approx(genie.statistics()[0]["precond_mean"], rel=1e-6)
    assert bool(((found["genie"] > 0) & (found["genie"] <= 1)).all())
