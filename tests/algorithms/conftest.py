"""Helpers for DG-method tests: a few real training steps through Hydra and Lightning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from genie_dg.module import DGModule
from genie_dg.pipeline import build


@pytest.fixture
def train_algorithm(make_config, small_run) -> Callable[..., tuple[DGModule, object]]:
    """``train_algorithm("coral", "genie", *overrides)`` fits 3 steps on tiny RotatedMNIST.

    Returns the module and the trainer; ``<run>/checkpoints/last.ckpt`` holds the final state.
    """

    def fit(algorithm: str, optimizer: str, *overrides: str, steps: int = 3):
        cfg = make_config(
            f"algorithm={algorithm}",
            f"optimizer={optimizer}",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "dataset.eval_batch_size=64",
            "+trainer.limit_val_batches=1",
            *small_run,
            *overrides,
        )
        datamodule, model, trainer = build(cfg)
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
