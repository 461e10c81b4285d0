"""End-to-end: Hydra-composed runs through Lightning, and train.py as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genie_dg.errors import UserInputError
from genie_dg.pipeline import build, train
from genie_dg.run_dir import prepare_output_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("optimizer", ["genie", "adam", "sgd"])
@pytest.mark.parametrize("algorithm", ["erm", "coral"])
def test_fast_dev_run_every_optimizer_with_every_algorithm(small_run, make_config, optimizer, algorithm):
    cfg = make_config(f"optimizer={optimizer}", f"algorithm={algorithm}", "+trainer.fast_dev_run=true", *small_run)
    datamodule, model, trainer, _ = build(cfg)
    before = [p.detach().clone() for p in model.network.parameters()]
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 1
    assert type(trainer.optimizers[0]).__name__.lower() == optimizer
    moved = [not torch.equal(a, p) for a, p in zip(before, model.network.parameters())]
    assert any(moved), "one optimizer step must change the network"


def test_train_selects_by_source_validation_and_reports_every_domain(small_run, make_config, tmp_path):
    cfg = make_config("trainer.max_steps=4", "trainer.val_check_interval=2", *small_run)
    summary = train(cfg)
    domains = {row["domain"]: row for row in summary["domains"]}
    assert domains["rot0"]["role"] == "target"
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in summary["domains"])
    sources = [row["accuracy"] for row in summary["domains"] if row["role"] == "source"]
    assert summary["source_acc"] == pytest.approx(sum(sources) / len(sources), abs=1e-6)
    run = Path(summary["files"]["run_dir"])
    assert json.loads((run / "summary.json").read_text())["target_acc"] == summary["target_acc"]
    assert Path(summary["files"]["checkpoint"]).name.startswith("best-step")
    # Checkpoints hold no pickled objects: they load under torch's weights_only default.
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert "optimizer" not in checkpoint["hyper_parameters"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.test_domains=[9]", "out of range"),
        ("dataset.batch_size=0", "batch_size"),
        ("trainer.max_steps=0", "max_steps"),
        ("trainer.val_check_interval=500", "val_check_interval"),
    ],
)
def test_bad_config_values_fail_before_training_with_the_fix(small_run, make_config, override, message):
    with pytest.raises(UserInputError, match=message):
        build(make_config(*small_run, override))


def test_image_dataset_without_data_directory_names_the_fix(make_config):
    with pytest.raises(UserInputError, match="PACS does not exist.*paths.data_dir"):
        build(make_config("dataset=pacs", "logger=csv"))


def test_pretrained_backbone_without_hub_or_weights_fails_fast(small_run, make_config, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserInputError, match="backbone.pretrained=true"):
        build(make_config("backbone.pretrained=true", *small_run))


def _run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PROJECT_ROOT": str(tmp_path)}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.e2e  # train.py in a process of its own
def test_train_py_prints_the_accuracy_table_and_where_it_wrote(tmp_path):
    result = _run_train(
        tmp_path,
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "dataset.batch_size=8",
        "backbone.channels=[8,16,32,64]",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for text in ("rot0", "target (unseen)", "source (held-out val)", "accuracy (%)"):
        assert text in out
    run = tmp_path / "run"
    # Under the working directory (tmp_path here), paths are shown relative to it.
    for name in ("config", "checkpoint", "csv_metrics", "wandb"):
        assert f"{name}: run/" in out.replace("\n", "")
    assert (run / "config_resolved.yaml").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "val/source_acc" in (run / "csv" / "metrics.csv").read_text()
    assert any((run / "wandb").glob("offline-run-*"))


@pytest.mark.e2e  # train.py in a process of its own
def test_train_py_bad_input_is_one_error_line_and_exit_code_2(tmp_path):
    result = _run_train(tmp_path, "dataset.test_domains=[9]", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out of range" in errors[0] and "dataset.test_domains" in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.e2e  # train.py in a process of its own
def test_train_py_unknown_group_option_lists_the_choices(tmp_path):
    result = _run_train(tmp_path, "dataset=pacz", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "Could not find 'dataset/pacz'" in result.stderr
    assert "rotated_mnist" in result.stderr


@pytest.mark.e2e  # train.py in a process of its own
def test_cfg_job_prints_the_composed_config(tmp_path):
    result = _run_train(tmp_path, "--cfg", "job", "dataset=pacs", "optimizer=genie")
    assert result.returncode == 0, result.stderr
    top = {line.split(":")[0] for line in result.stdout.splitlines() if line and not line[0].isspace()}
    assert {"dataset", "algorithm", "optimizer", "backbone", "trainer"} <= top
    assert "_target_: genie_dg.optim.GENIE" in result.stdout


def test_config_key_typo_is_refused_with_the_key_named(make_config):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.max_step"):
        make_config("trainer.max_step=5")


def test_unwritable_run_directory_fails_at_start_with_the_fix(make_config, small_run, tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the run directory should go")
    cfg = make_config("trainer.max_steps=2", "trainer.val_check_interval=2", *small_run)
    cfg.paths.output_dir = str(blocker / "run")
    with pytest.raises(UserInputError, match="cannot write the run directory.*paths.log_dir"):
        train(cfg)
    assert blocker.read_text().startswith("a file"), "nothing of the user's is touched"


def test_sweeps_started_side_by_side_share_a_sweep_dir(tmp_path):
    """Two multiruns into one hydra.sweep.dir prove it writable at the same moment; a shared
    probe file name made one of them fail (the other had just removed it)."""
    from concurrent.futures import ThreadPoolExecutor

    def prove(_: int) -> None:
        for _ in range(200):
            prepare_output_dir(tmp_path / "sweep")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(prove, range(4)))
    assert list((tmp_path / "sweep").iterdir()) == []


@pytest.mark.e2e  # train.py in a process of its own
@pytest.mark.parametrize("mode, key", [((), "hydra.run.dir"), (("-m",), "hydra.sweep.dir")], ids=["run", "multirun"])
def test_unwritable_hydra_directory_fails_with_one_line(mode, key, tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the run directory should go")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *mode, f"{key}={blocker / 'run'}", "trainer.max_steps=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot write the run directory"), result.stderr
    assert key in result.stderr and "Traceback" not in result.stderr
    assert blocker.read_text().startswith("a file")
