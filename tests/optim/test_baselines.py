"""The paper's baseline optimizers: configs, training through DGModule, SAM/GAM/FAD by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from genie_dg.errors import UserInputError
from genie_dg.optim import FAD, GAM, SAM
from genie_dg.pipeline import build, instantiate_or_explain

# Forward/backward passes per training step, as logged in train/passes_per_step.
PASSES = {"genie": 1, "sgd": 1, "adam": 1, "adamw": 1, "yogi": 1, "adabelief": 1, "adahessian": 1}
PASSES |= {"sam": 2, "gam": 2, "fad": 4}
CLASSES = {
    "genie": "GENIE",
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "yogi": "Yogi",
    "adabelief": "AdaBelief",
    "adahessian": "AdaHessian",
    "sam": "SAM",
    "gam": "GAM",
    "fad": "FAD",
}
DISTRIBUTIONS = {"uniform", "log10_uniform", "pow2_uniform"}


def _fit(short_run_config, optimizer: str, *overrides: str, steps: int = 5):
    datamodule, model, trainer, _ = build(short_run_config(f"optimizer={optimizer}", *overrides, steps=steps))
    return datamodule, model, trainer


def _train_on_one_batch(datamodule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Make every training step see the run's first batch; returns its images and labels."""
    batch = next(iter(datamodule.train_dataloader()))
    datamodule.train_dataloader = lambda: DataLoader([batch] * steps, batch_size=None)
    return torch.cat([b.x for b in batch]), torch.cat([b.y for b in batch])


def _loss(network: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    # Training mode (batch statistics, as during training) on a copy, so running stats stay put.
    network = copy.deepcopy(network).train()
    with torch.no_grad():
        return F.cross_entropy(network(x), y).item()


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_config_has_a_valid_search_and_builds_with_overrides(make_config, name):
    cfg = make_config(f"optimizer={name}")
    search = OmegaConf.to_container(cfg.optimizer.search)
    assert search, "every optimizer declares its search distribution"
    for key, spec in search.items():
        assert key in cfg.optimizer, f"search key {key} is not an argument of the config"
        if spec is None:  # a null spec switches that search off (genie_dg.sweep)
            continue
        if spec["dist"] == "choice":
            assert len(spec["values"]) >= 2
        else:
            assert spec["dist"] in DISTRIBUTIONS and spec["low"] < spec["high"]
    factory = instantiate_or_explain(cfg.optimizer)
    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2))]
    built = factory(params, lr=0.0123, weight_decay=0.0)
    assert type(built).__name__ == CLASSES[name]
    assert all(group["lr"] == 0.0123 for group in built.param_groups)
    if name in ("sam", "gam", "fad"):
        assert type(built.base_optimizer) is torch.optim.Adam
        assert built.base_optimizer.param_groups is built.param_groups


@pytest.mark.parametrize("name", sorted(PASSES))
def test_optimizer_trains_the_default_experiment_and_lowers_the_loss(short_run_config, name):
    steps = 5
    datamodule, model, trainer = _fit(short_run_config, name, steps=steps)
    # One fixed batch: its loss must fall, whatever the noise between different batches.
    x, y = _train_on_one_batch(datamodule, steps)
    before = _loss(model.network, x, y)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == steps
    assert type(trainer.optimizers[0]).__name__ == CLASSES[name]
    assert trainer.callback_metrics["train/passes_per_step"].item() == PASSES[name]
    after = _loss(model.network, x, y)
    assert after < before - 0.02, f"{name}: loss on the training batch {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("name", sorted(PASSES))
def test_optimizer_supports_bf16_mixed_precision(short_run_config, name):
    datamodule, model, trainer = _fit(short_run_config, name, "trainer.precision=bf16-mixed", steps=2)
    before = [p.detach().clone() for p in model.network.parameters()]
    trainer.fit(model, datamodule=datamodule)
    assert trainer.precision == "bf16-mixed"
    assert trainer.global_step == 2
    assert trainer.callback_metrics["train/passes_per_step"].item() == PASSES[name]
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.network.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.network.parameters()))


@pytest.mark.parametrize("name", ["sam", "gam", "fad"])
def test_every_pass_evaluates_the_full_dg_loss_and_only_the_first_is_logged(short_run_config, name):
    datamodule, model, trainer = _fit(short_run_config, name, "algorithm=coral", steps=2)
    losses: list[float] = []
    penalties: list[float] = []
    training_loss = model.algorithm.training_loss

    def recording(network, batches):
        output = training_loss(network, batches)
        losses.append(output.loss.item())
        penalties.append(output.metrics["coral_penalty"].item())
        return output

    model.algorithm.training_loss = recording
    trainer.fit(model, datamodule=datamodule)
    assert len(losses) == 2 * PASSES[name]
    assert all(p > 0 for p in penalties), "CORAL's penalty is part of every pass"
    last_step = losses[PASSES[name] :]
    assert len(set(last_step)) == len(last_step), "the later passes are at other (perturbed) weights"
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(last_step[0])


def test_running_statistics_come_from_the_unperturbed_pass_only(short_run_config):
    datamodule, model, trainer = _fit(short_run_config, "sam", "optimizer.rho=1.0", steps=1)
    x, _ = _train_on_one_batch(datamodule, 1)
    featurizer = model.network.featurizer
    bn = featurizer.bn1
    with torch.no_grad():
        batch_mean = featurizer.conv1(x).mean(dim=(0, 2, 3))
    expected = (1 - bn.momentum) * bn.running_mean + bn.momentum * batch_mean
    trainer.fit(model, datamodule=datamodule)
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["sam", "gam", "fad"])
def test_closure_optimizers_are_refused_under_manual_optimization(short_run_config, name):
    datamodule, model, trainer = _fit(short_run_config, name, steps=1)
    # As an algorithm with automatic_optimization = False (DANN, MLDG...) sets it.
    model.automatic_optimization = False
    with pytest.raises(UserInputError, match=f"optimizer {name.upper()} re-evaluates the loss"):
        trainer.fit(model, datamodule=datamodule)


@pytest.mark.parametrize("name", ["sam", "adahessian"])
def test_fp16_mixed_precision_is_refused_for_closure_and_second_order_optimizers(short_run_config, monkeypatch, name):
    datamodule, model, trainer = _fit(short_run_config, name, steps=1)
    # 16-mixed needs a GPU; the refusal only reads the precision Lightning reports.
    monkeypatch.setattr(type(trainer), "precision", property(lambda self: "16-mixed"))
    with pytest.raises(UserInputError, match="16-mixed"):
        trainer.fit(model, datamodule=datamodule)


class _Quadratic(nn.Module):
    def __init__(self, theta: np.ndarray, a: np.ndarray) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta))
        self.a = torch.tensor(a)

    def loss(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.a @ self.theta


def test_sam_perturbs_along_the_normalised_gradient_of_a_quadratic():
    a = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
    theta = np.array([1.0, -2.0, 0.5])
    rho, lr = 0.1, 0.2
    model = _Quadratic(theta, a)
    optimizer = SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=rho, lr=lr)
    visited = []

    def closure():
        optimizer.zero_grad()
        visited.append(model.theta.detach().numpy().copy())
        loss = model.loss()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    gradient = a @ theta
    perturbed = theta + rho * gradient / np.linalg.norm(gradient)
    assert loss.item() == pytest.approx(0.5 * theta @ a @ theta)
    # pytorch-optimizer takes the gradient norm in float32.
    np.testing.assert_allclose(visited, [theta, perturbed], rtol=1e-6)
    np.testing.assert_allclose(model.theta.detach().numpy(), theta - lr * a @ perturbed, rtol=1e-6)


class _Logistic(nn.Module):
    """Logistic regression with weights and bias as two tensors (norms span both)."""

    def __init__(self, theta: np.ndarray, x: np.ndarray, s: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(theta[:-1]))
        self.b = nn.Parameter(torch.tensor(theta[-1:]))
        self.x, self.s = torch.tensor(x), torch.tensor(s)

    def loss(self) -> torch.Tensor:
        return F.softplus(-self.s * (self.x @ self.w + self.b)).mean()

    def theta(self) -> np.ndarray:
        return np.concatenate([self.w.detach().numpy(), self.b.detach().numpy()])


def _logistic_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    s = np.array([1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    theta = np.array([0.3, -0.2, 0.5, 0.1])
    features = np.hstack([x, np.ones((6, 1))])

    def grad(t):
        z = s * (features @ t)
        return -(s / (1 + np.exp(z))) @ features / len(s)

    def hessian(t):
        p = 1 / (1 + np.exp(-s * (features @ t)))
        return (features.T * (p * (1 - p))) @ features / len(s)

    return x, s, theta, grad, hessian


def _step(optimizer_class, model: _Logistic, create_graph: bool, **kwargs):
    optimizer = optimizer_class(model.parameters(), base_optimizer=torch.optim.SGD, **kwargs)

    def closure():
        optimizer.zero_grad()
        loss = model.loss()
        loss.backward(create_graph=create_graph)
        return loss

    return optimizer.step(closure)


def _unit(v: np.ndarray, xi: float = 1e-12) -> np.ndarray:
    return v / (np.linalg.norm(v) + xi)


def test_gam_step_matches_the_hand_computed_update():
    x, s, theta, grad, hessian = _logistic_problem()
    rho, alpha, lr = 0.3, 0.7, 0.5
    model = _Logistic(theta, x, s)
    _step(GAM, model, create_graph=True, rho=rho, alpha=alpha, lr=lr)
    g = grad(theta)
    adversarial = theta + rho * _unit(hessian(theta) @ _unit(g))
    g_adv = grad(adversarial)
    expected = theta - lr * (g + alpha * rho * hessian(adversarial) @ _unit(g_adv))
    np.testing.assert_allclose(model.theta(), expected, rtol=1e-10)
    assert not np.allclose(expected, theta - lr * g), "the flatness term must matter here"


def test_gam_without_the_gradient_graph_says_what_is_missing():
    x, s, theta, _, _ = _logistic_problem()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        _step(GAM, _Logistic(theta, x, s), create_graph=False)


def test_fad_step_matches_the_hand_computed_update():
    x, s, theta, grad, _ = _logistic_problem()
    rho, alpha, beta, lr = 0.3, 0.4, 0.8, 0.5
    model = _Logistic(theta, x, s)
    _step(FAD, model, create_graph=False, rho=rho, alpha=alpha, beta=beta, lr=lr)
    g0 = grad(theta)
    g1 = grad(theta + rho * _unit(g0))
    adversarial = theta + rho * _unit(g1 - g0)
    g2 = grad(adversarial)
    g3 = grad(adversarial + rho * _unit(g2))
    expected = theta - lr * (g0 + beta * (alpha * (g1 - g0) + (1 - alpha) * (g3 - g2)))
    np.testing.assert_allclose(model.theta(), expected, rtol=1e-10)


def test_fad_defaults_are_the_reconstruction_of_issue_18():
    x, s, theta, _, _ = _logistic_problem()
    optimizer = FAD(_Logistic(theta, x, s).parameters(), base_optimizer=torch.optim.SGD, lr=0.1)
    assert (optimizer.rho, optimizer.alpha, optimizer.beta) == (0.05, 0.5, 1.0)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_fad_refuses_alpha_outside_zero_one(alpha):
    x, s, theta, _, _ = _logistic_problem()
    with pytest.raises(ValueError, match="0 <= alpha <= 1"):
        FAD(_Logistic(theta, x, s).parameters(), base_optimizer=torch.optim.SGD, alpha=alpha, lr=0.1)


def test_fad_with_alpha_one_and_beta_one_is_sam():
    x, s, theta, _, _ = _logistic_problem()
    fad, sam = _Logistic(theta, x, s), _Logistic(theta, x, s)
    _step(FAD, fad, create_graph=False, rho=0.3, alpha=1.0, beta=1.0, lr=0.5)
    _step(SAM, sam, create_graph=False, rho=0.3, lr=0.5)
    np.testing.assert_allclose(fad.theta(), sam.theta(), rtol=1e-6)  # SAM's norm is float32


@pytest.mark.parametrize("optimizer_class", [SAM, GAM, FAD])
def test_step_without_closure_is_refused(optimizer_class):
    model = _Quadratic(np.ones(3), np.eye(3))
    optimizer = optimizer_class(model.parameters(), base_optimizer=torch.optim.SGD, lr=0.1)
    model.loss().backward()
    with pytest.raises(Exception, match="requires closure"):
        optimizer.step()


@pytest.mark.parametrize("optimizer_class", [GAM, FAD])
def test_state_dict_round_trip_continues_identically(optimizer_class):
    x, s, theta, _, _ = _logistic_problem()
    create_graph = optimizer_class is GAM

    def run(model, optimizer, steps):
        def closure():
            optimizer.zero_grad()
            loss = model.loss()
            loss.backward(create_graph=create_graph)
            return loss

        for _ in range(steps):
            optimizer.step(closure)

    straight = _Logistic(theta, x, s)
    run(straight, optimizer_class(straight.parameters(), base_optimizer=torch.optim.Adam, lr=0.1), 4)
    first = _Logistic(theta, x, s)
    optimizer = optimizer_class(first.parameters(), base_optimizer=torch.optim.Adam, lr=0.1)
    run(first, optimizer, 2)
    resumed = _Logistic(first.theta(), x, s)
    reloaded = optimizer_class(resumed.parameters(), base_optimizer=torch.optim.Adam, lr=0.1)
    reloaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert reloaded.base_optimizer.state is reloaded.state
    run(resumed, reloaded, 2)
    np.testing.assert_allclose(resumed.theta(), straight.theta(), rtol=1e-12)
