"""Shared fixtures: Hydra configs composed the way train.py composes them, sized for CPU tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from genie_dg.conf import CONFIG_DIR as PACKAGED_CONFIG_DIR
from genie_dg.resolvers import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(PACKAGED_CONFIG_DIR)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
register_resolvers()


# Overrides that shrink a run to seconds on a CPU: CSV logging only, tiny batches and network.
SMALL_RUN = (
    "logger=csv",
    "dataset.batch_size=8",
    "backbone.channels=[8,16,32,64]",
    "~callbacks.rich_progress_bar",
)


def compose_config(overrides: Sequence[str], tmp_path: Path) -> DictConfig:
    """The composed train config with paths pointing into ``tmp_path``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str) -> DictConfig:
        return compose_config(overrides, tmp_path)

    return make


@pytest.fixture(scope="session")
def small_run() -> tuple[str, ...]:
    """Hydra overrides for a seconds-long run (see ``SMALL_RUN``)."""
    return SMALL_RUN


@pytest.fixture
def short_run_config(make_config, small_run) -> Callable[..., DictConfig]:
    """``short_run_config(*overrides, steps=n)``: a small run of ``n`` steps, validated once at
    the end on one batch per evaluation set (enough for checkpoints and records)."""

    def make(*overrides: str, steps: int) -> DictConfig:
        return make_config(
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "dataset.eval_batch_size=64",
            "+trainer.limit_val_batches=1",
            *small_run,
            *overrides,
        )

    return make


# Fixtures that mean a test trains through Lightning (seconds to minutes on 2 cores each).
TRAINING_FIXTURES = {"short_run_config", "small_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that trains a run is ``slow``: ``make test-fast`` leaves it out. A ``cuda`` test is
    skipped, with its reason, where torch sees no CUDA device; on a GPU machine it runs."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device") if not torch.cuda.is_available() else None
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if no_cuda is not None and item.get_closest_marker("cuda"):
            item.add_marker(no_cuda)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Tests of the fast tier work on tiny tensors: one intra-op thread avoids OpenMP
    oversubscription, which makes them many times slower on a busy 2-core machine (set around
    the whole test, so a module fixture it builds gets it too). ``slow`` and ``e2e`` tests (real
    training, real data) keep torch's default."""
    if item.get_closest_marker("slow") or item.get_closest_marker("e2e"):
        return (yield)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return (yield)
    finally:
        torch.set_num_threads(before)
