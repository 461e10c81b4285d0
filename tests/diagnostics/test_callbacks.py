"""The diagnostics callbacks in a real (tiny) training run, selected with callbacks=diagnostics."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from matplotlib.figure import Figure
from omegaconf import open_dict

from genie_dg.diagnostics import FeatureMap, OSGRMonitor, UpdateBalanceMonitor
from genie_dg.diagnostics.figures import save_figure
from genie_dg.errors import UserInputError
from genie_dg.pipeline import build

STEPS = 3
FIGURES = ("osgr.png", "gsnr_per_layer.png", "update_balance.png", "feature_map_tsne.png")


def _fit(make_config, small_run, run: Path, *overrides: str):
    cfg = make_config(
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "+trainer.limit_val_batches=1",
        "dataset.eval_batch_size=64",
        *small_run,
        *overrides,
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
    datamodule, model, trainer, _ = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    return model, trainer


def test_diagnostics_leave_training_bitwise_unchanged_and_write_numbers_and_figures(make_config, small_run, tmp_path):
    plain, plain_trainer = _fit(make_config, small_run, tmp_path / "plain")
    run = tmp_path / "diagnosed"
    diagnosed, trainer = _fit(
        make_config,
        small_run,
        run,
        "callbacks=diagnostics",
        "callbacks.osgr.every_n_steps=1",
        "callbacks.osgr.samples_per_unit=4",
        "callbacks.update_balance.every_n_steps=1",
        "callbacks.feature_map.max_samples_per_domain=15",
    )
    kinds = {type(c) for c in trainer.callbacks}
    assert {OSGRMonitor, UpdateBalanceMonitor, FeatureMap} <= kinds
    # GENIE with noise and mask: its generator state must be restored too.
    assert type(trainer.optimizers[0]).__name__ == "GENIE"
    for name, value in plain.state_dict().items():
        assert torch.equal(value, diagnosed.state_dict()[name]), name
    a, b = plain_trainer.optimizers[0].state_dict(), trainer.optimizers[0].state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)
    assert all(torch.equal(a["generator_states"][k], b["generator_states"][k]) for k in a["generator_states"])

    for name in FIGURES:
        path = run / "diagnostics" / name
        assert path.is_file() and path.stat().st_size > 0, name
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))

    def logged(key: str) -> list[float]:
        return [float(row[key]) for row in rows if row.get(key)]

    def steps(key: str) -> list[int]:
        return [int(row["step"]) for row in rows if row.get(key)]

    # Each number is logged at the step whose update it describes.
    for key in ("osgr/estimated", "osgr/measured_source", "osgr/measured_target", "balance/update_gini"):
        assert steps(key) == list(range(STEPS)), key
    assert all(d > 0 for d in logged("osgr/train_decrease")), "each measured step lowers the training loss"
    assert all(r <= 1 for r in logged("osgr/estimated"))
    assert all(0 < g < 1 for g in logged("balance/update_gini"))


def test_bad_settings_fail_at_construction():
    with pytest.raises(UserInputError, match="every_n_steps"):
        OSGRMonitor(every_n_steps=0)
    with pytest.raises(UserInputError, match="both false"):
        OSGRMonitor(measured=False, estimated=False)
    with pytest.raises(UserInputError, match="choose one of"):
        FeatureMap(method="pca")


def test_umap_without_umap_learn_names_the_fix(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "umap" else real(name, *a))
    with pytest.raises(UserInputError, match="pip install umap-learn"):
        FeatureMap(method="umap")


def test_figures_go_to_the_run_directory_and_to_wandb_as_images(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(
        WandbLogger, "log_image", lambda self, key, images, step=None: logged.append((key, images, step))
    )
    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    path = save_figure(
        figure, tmp_path / "diagnostics" / "curve.png", [WandbLogger(save_dir=str(tmp_path), offline=True)], 7
    )
    assert path.stat().st_size > 0
    assert logged == [("diagnostics/curve", [str(path)], 7)]
