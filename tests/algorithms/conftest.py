"""Helpers for DG-method tests: tiny networks and minibatches for checking a method's loss or
step by hand, and a few real training steps through Hydra and Lightning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms import DomainBatch, StepContext
from genie_dg.models import Classifier
from genie_dg.module import DGModule
from genie_dg.pipeline import build


class Identity(nn.Module):
    """A featurizer whose features are its input's ``num_features`` columns."""

    def __init__(self, num_features: int = 3) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ManualModule:
    """Stands in for the training loop of a manually optimized method: ``context`` is the
    :class:`StepContext` its ``manual_step`` gets (the network, the optimizers, plain
    ``loss.backward()``); ``steps`` counts the optimizer steps."""

    def __init__(self, network: nn.Module, optimizers: torch.optim.Optimizer | list[torch.optim.Optimizer]) -> None:
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        self.network = network
        self.context = StepContext(network, optimizers, torch.Tensor.backward)
        self.steps = 0
        for optimizer in optimizers:
            optimizer.register_step_post_hook(self._count_step)

    def _count_step(self, *_: object) -> None:
        self.steps += 1


@pytest.fixture
def make_network() -> Callable[..., Classifier]:
    """``make_network(num_classes=2, featurizer=None, num_features=3)``: a ``Classifier`` over
    ``featurizer`` (by default an :class:`Identity` with ``num_features`` features), built right
    after ``torch.manual_seed(0)`` so its head is the same in every call."""

    def make(num_classes: int = 2, featurizer: nn.Module | None = None, num_features: int = 3) -> Classifier:
        torch.manual_seed(0)
        return Classifier(featurizer or Identity(num_features), num_classes=num_classes)

    return make


@pytest.fixture
def make_batches() -> Callable[..., list[DomainBatch]]:
    """``make_batches(n_domains=2)``: six 3-feature samples per domain, labelled
    ``[0, 1, 0, 1, 1, 0]``, domain ``d`` scaled by ``d + 1`` and shifted by ``d`` (seeded)."""

    def make(n_domains: int = 2) -> list[DomainBatch]:
        torch.manual_seed(1)
        y = torch.tensor([0, 1, 0, 1, 1, 0])
        return [DomainBatch(torch.randn(6, 3) * (d + 1) + d, y, d) for d in range(n_domains)]

    return make


@pytest.fixture
def manual_module() -> type[ManualModule]:
    """:class:`ManualModule`: ``manual_module(network, optimizers).context`` is what a method's
    ``manual_step`` gets from the training loop."""
    return ManualModule


@pytest.fixture
def linear_gradient() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``linear_gradient(weight, bias, x, y)``: the closed-form gradient of the mean
    cross-entropy of ``x @ weight.T + bias``, as ``(d weight, d bias)``."""

    def gradient(
        weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = ((x @ weight.T + bias).softmax(-1) - F.one_hot(y, weight.shape[0])) / len(y)
        return residual.T @ x, residual.sum(0)

    return gradient


@pytest.fixture
def train_algorithm(short_run_config) -> Callable[..., tuple[DGModule, object]]:
    """``train_algorithm("coral", "genie", *overrides)`` fits 3 steps on tiny RotatedMNIST.

    Returns the module and the trainer; ``<run>/checkpoints/last.ckpt`` holds the final state.
    """

    def fit(algorithm: str, optimizer: str, *overrides: str, steps: int = 3):
        cfg = short_run_config(f"algorithm={algorithm}", f"optimizer={optimizer}", *overrides, steps=steps)
        datamodule, model, trainer, _ = build(cfg)
        before = [p.detach().clone() for p in model.network.parameters()]
        trainer.fit(model, datamodule=datamodule)
        assert trainer.global_step == steps, "one optimizer step per training step"
        assert int(model.algorithm.update_count) == steps
        moved = [not torch.equal(a, p) for a, p in zip(before, model.network.parameters())]
        assert any(moved), "training must change the network"
        assert all(torch.isfinite(p).all() for p in model.parameters())
        return model, trainer

    return fit


@pytest.fixture
def saved_state() -> Callable[[object], dict[str, torch.Tensor]]:
    """``saved_state(trainer)``: the module state in ``last.ckpt``, loaded with weights_only."""

    def load(trainer) -> dict[str, torch.Tensor]:
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        return torch.load(path, weights_only=True)["state_dict"]

    return load
