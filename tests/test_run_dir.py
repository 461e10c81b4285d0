"""Damaged and foreign files, a run directory's one configuration, bad values, loggers across a
resume: each case of issue 17 that is not a signal (those are tests/test_faults.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genie_dg.errors import UserInputError
from genie_dg.pipeline import train
from genie_dg.run_dir import DONE_MARKER, LAST_CHECKPOINT

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "PROJECT_ROOT": str(tmp_path)}


# ----------------------------------------------------------------------------- damaged files

TINY = ("trainer.deterministic=true", "trainer.max_steps=4", "trainer.val_check_interval=2")


def _tiny_config(make_config, small_run, output_dir: Path, *overrides: str):
    cfg = make_config(*small_run, *TINY, *overrides)
    cfg.paths.output_dir = str(output_dir)
    return cfg


def test_a_damaged_last_checkpoint_resumes_from_the_newest_valid_one_saying_so(
    small_run, make_config, tmp_path, caplog
):
    run = tmp_path / "run"
    train(_tiny_config(make_config, small_run, run))
    records = (run / "results.jsonl").read_text()
    # Killed during a copy onto another disk: last.ckpt cut in half, the run not marked done.
    (run / DONE_MARKER).unlink()
    last = run / LAST_CHECKPOINT
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    with caplog.at_level(logging.WARNING, logger="genie_dg"):
        summary = train(_tiny_config(make_config, small_run, run))
    assert f"{last} is truncated or not a checkpoint" in caplog.text
    assert f"resuming from {best} instead" in caplog.text
    assert summary["steps"] == 4 and (run / DONE_MARKER).is_file()
    assert (run / "results.jsonl").read_text() == records


def test_a_write_cut_short_leaves_the_previous_file_whole(tmp_path):
    from genie_dg.run_dir import atomic_writer

    target = tmp_path / "last.ckpt"
    target.write_text("the previous checkpoint")
    with pytest.raises(OSError, match="disk full"):
        with atomic_writer(target, "w") as file:
            file.write("half of the new one")
            raise OSError("disk full")
    assert target.read_text() == "the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file is left"


# ----------------------------------------------------------------------------- foreign checkpoints


@pytest.fixture
def finished_tiny_run(small_run, make_config, tmp_path) -> Path:
    """A finished 4-step run of GENIE (lr 0.5) on the default narrow backbone; its last checkpoint."""
    run = tmp_path / "source_run"
    train(_tiny_config(make_config, small_run, run))
    return run / LAST_CHECKPOINT


def _one_line_error(cfg) -> str:
    with pytest.raises(UserInputError) as raised:
        train(cfg)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_a_checkpoint_of_another_learning_rate_is_refused_or_its_weights_taken_on_request(
    finished_tiny_run, small_run, make_config, tmp_path
):
    def start(name: str, *overrides: str):
        return _tiny_config(
            make_config, small_run, tmp_path / name, "optimizer.lr=0.1", f"ckpt_path={finished_tiny_run}", *overrides
        )

    message = _one_line_error(start("refused"))
    assert "written by a run of another configuration (optimizer.lr is 0.5 in the checkpoint, 0.1 here)" in message
    assert "+ckpt_weights_only=true" in message
    assert not (tmp_path / "refused" / "checkpoints").exists()

    summary = train(start("weights", "+ckpt_weights_only=true"))
    assert summary["steps"] == 4, "weights only: the run starts at step 0, not at the checkpoint's step"
    state = torch.load(tmp_path / "weights" / LAST_CHECKPOINT, weights_only=True)
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == 0.1, "trained at the configured rate"


def test_a_checkpoint_of_another_backbone_is_refused_in_one_line_even_for_its_weights(
    finished_tiny_run, small_run, make_config, tmp_path
):
    other = ("backbone.channels=[8,16,32,32]", f"ckpt_path={finished_tiny_run}")
    message = _one_line_error(_tiny_config(make_config, small_run, tmp_path / "a", *other))
    assert "backbone.channels" in message
    message = _one_line_error(_tiny_config(make_config, small_run, tmp_path / "b", *other, "+ckpt_weights_only=true"))
    assert "its weights do not fit this model" in message and "backbone.channels" in message


@pytest.mark.parametrize("content, said", [(b"", "is empty"), (None, "is truncated or not a checkpoint")])
def test_an_empty_or_truncated_start_checkpoint_is_one_line(
    content, said, finished_tiny_run, small_run, make_config, tmp_path
):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(finished_tiny_run.read_bytes()[:1000] if content is None else content)
    message = _one_line_error(_tiny_config(make_config, small_run, tmp_path / "run", f"ckpt_path={broken}"))
    assert f"ckpt_path {broken} {said}" in message


def test_a_run_directory_belongs_to_one_configuration(small_run, make_config, tmp_path):
    run = tmp_path / "run"
    first = train(_tiny_config(make_config, small_run, run))
    summary = (run / "summary.json").read_bytes()
    message = _one_line_error(_tiny_config(make_config, small_run, run, "optimizer.lr=0.1"))
    assert f"{run} holds a run of another configuration (optimizer.lr is 0.5 there, 0.1 here)" in message
    assert (run / "summary.json").read_bytes() == summary
    assert train(_tiny_config(make_config, small_run, run)) == first, "the same config is still its own"


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "overrides, named",
    [
        (("optimizer=sgd", "optimizer.lr=-1"), "SGD refuses its arguments (Invalid learning rate: -1"),
        (("optimizer=adabelief", "optimizer.lr=-1"), "AdaBelief refuses its arguments"),
        (("seed=-1",), "seed=-1: a seed is a whole number"),
        (("trial_seed=abc",), "trial_seed='abc': a seed is a whole number"),
    ],
    ids=["torch-sgd-lr", "pytorch-optimizer-lr", "seed", "trial_seed"],
)
def test_an_invalid_optimizer_argument_or_seed_is_one_error_line(overrides, named, small_run, make_config, tmp_path):
    message = _one_line_error(_tiny_config(make_config, small_run, tmp_path / "run", *overrides))
    assert named in message


def test_a_failed_start_leaves_no_run_folder_and_a_fixed_run_dir_keeps_its_configuration(small_run, tmp_path):
    def run(*overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / "train.py"), *small_run, *TINY, *overrides]
        return subprocess.run(command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)

    failed = run("optimizer=sgd", "optimizer.lr=-1")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1].startswith("error: optimizer SGD refuses its arguments")
    runs = tmp_path / "logs" / "train" / "runs"
    assert not runs.exists() or not list(runs.iterdir()), "the failed start left its run folder behind"

    fixed = tmp_path / "fixed"
    assert run(f"hydra.run.dir={fixed}").returncode == 0
    hydra_files = {p.name: p.read_bytes() for p in (fixed / ".hydra").iterdir()}
    other = run(f"hydra.run.dir={fixed}", "optimizer.lr=0.1")
    assert other.returncode == 2
    (line,) = [line for line in other.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: {fixed} holds a run of another configuration (optimizer.lr is 0.5 there, 0.1 here)")
    assert {p.name: p.read_bytes() for p in (fixed / ".hydra").iterdir()} == hydra_files
    assert "Traceback" not in other.stderr


# ----------------------------------------------------------------------------- loggers


def test_a_resumed_run_logs_into_the_same_wandb_run(small_run, make_config, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from genie_dg.pipeline import build

    def wandb_id() -> str:
        cfg = _tiny_config(make_config, [o for o in small_run if o != "logger=csv"], tmp_path / "run", "logger=wandb")
        (logger,) = [lg for lg in build(cfg)[2].loggers if isinstance(lg, WandbLogger)]
        return logger._wandb_init["id"]

    first = wandb_id()
    assert first and wandb_id() == first


def test_wandb_online_without_a_network_logs_offline_and_says_so(small_run, make_config, tmp_path, monkeypatch, caplog):
    from lightning.pytorch.loggers import WandbLogger

    from genie_dg.pipeline import build

    monkeypatch.setenv("WANDB_MODE", "online")
    # A port nothing listens on: the connection is refused at once, as without a network.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    cfg = _tiny_config(make_config, [o for o in small_run if o != "logger=csv"], tmp_path / "run", "logger=wandb")
    with caplog.at_level(logging.WARNING, logger="genie_dg"):
        (logger,) = [lg for lg in build(cfg)[2].loggers if isinstance(lg, WandbLogger)]
    assert logger._wandb_init["mode"] == "offline"
    assert "W&B: cannot reach http://127.0.0.1:9" in caplog.text and "logging offline instead" in caplog.text


def test_the_progress_bar_counts_the_whole_run_after_a_resume(make_config):
    from types import SimpleNamespace

    from hydra.utils import instantiate

    bar = instantiate(make_config().callbacks.rich_progress_bar)
    # Resumed at step 200 of 300: the bar's count goes on from 200, so its total is 300 (not 99).
    bar._trainer = SimpleNamespace(
        max_epochs=-1, max_steps=300, global_step=200, num_training_batches=float("inf"), accumulate_grad_batches=1
    )
    assert bar.total_train_batches == 300


def test_a_run_stopped_after_its_test_keeps_one_csv_history(small_run, make_config, tmp_path):
    run = tmp_path / "run"
    train(_tiny_config(make_config, small_run, run))
    history = (run / "csv" / "metrics.csv").read_text()
    # Killed after the test, before the done marker: the rerun tests again, the history stays one.
    (run / DONE_MARKER).unlink()
    train(_tiny_config(make_config, small_run, run))
    assert (run / "csv" / "metrics.csv").read_text() == history
    assert sum(line.startswith(",4,") for line in history.splitlines()) == 1, "one test row, at step 4"
