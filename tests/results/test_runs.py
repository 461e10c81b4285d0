"""Real tiny runs: results.jsonl, skipping finished runs, resuming unfinished ones, W&B naming."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import WandbLogger

from genie_dg import pipeline, reporting
from genie_dg.pipeline import build, train

from helpers.wandb_file import read_records

ROOT = Path(__file__).resolve().parents[2]
TINY = ("trainer.max_steps=4", "trainer.val_check_interval=2")
# Shaped like a W&B API key, so that wandb accepts it.
SECRET = "0123456789abcdef0123456789abcdef01234567"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_every_validation_appends_a_record_of_the_run_and_its_accuracies(small_run, make_config, tmp_path):
    cfg = make_config(*small_run, *TINY, "+dataset.target_holdout=true", "trial_seed=1", "hparams_seed=2")
    summary = train(cfg)
    run = tmp_path / "run"
    records = _records(run)
    assert [r["step"] for r in records] == [2, 4]
    first = records[0]
    assert {k: first[k] for k in ("dataset", "protocol", "algorithm", "optimizer", "test_domains")} == {
        "dataset": "rotated_mnist",
        "protocol": "lodo",
        "algorithm": "ERM",
        "optimizer": "GENIE",
        "test_domains": ["rot0"],
    }
    assert first["train_domains"] == ["rot15", "rot30", "rot45", "rot60", "rot75"]
    assert (first["trial_seed"], first["hparams_seed"], first["seed"]) == (1, 2, 1)
    # hparams_seed 2 draws GENIE's hyper-parameters: the run trained with them, and says so.
    assert (
        first["hparams"]
        == summary["run"]["hparams"]
        != {"optimizer.lr": 0.5, "optimizer.beta": 0.95, "optimizer.p": 0.4, "optimizer.weight_decay": 0.0}
    )
    resolved = yaml.safe_load((run / "config_resolved.yaml").read_text())
    assert resolved["optimizer"]["lr"] == first["hparams"]["optimizer.lr"]
    for record in records:
        accuracy = record["accuracy"]
        assert {d: set(s) for d, s in accuracy.items()} == {
            **{d: {"out"} for d in first["train_domains"]},
            "rot0": {"in", "out"},
        }
        assert all(0.0 <= v <= 1.0 for splits in accuracy.values() for v in splits.values())
    # The summary embeds the records' identity, built once: the same fields, the same values.
    assert summary["run"] == {k: v for k, v in first.items() if k not in ("step", "accuracy")}
    assert json.loads((run / "summary.json").read_text())["run"] == summary["run"]
    roles = {row["domain"]: row["role"] for row in summary["domains"]}
    assert roles["rot0"] == "target" and roles["rot0/out"] == "target_validation"
    assert summary["target_acc"] == next(r["accuracy"] for r in summary["domains"] if r["domain"] == "rot0")
    assert (run / "done").is_file()


def test_a_finished_run_is_skipped_and_an_unfinished_one_resumes_from_its_last_checkpoint(
    small_run, make_config, tmp_path, monkeypatch, caplog
):
    run = tmp_path / "run"
    first = train(make_config(*small_run, "trainer.max_steps=2", "trainer.val_check_interval=2"))

    def no_training(cfg):
        raise AssertionError("a finished run was built again")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "build", no_training)
        assert train(make_config(*small_run, "trainer.max_steps=2", "trainer.val_check_interval=2")) == first

    # A 4-step run interrupted after step 2 (the 2-step run's checkpoint and records, copied), with
    # a record written past the checkpoint and a last line cut short by the kill: resume, drop both.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")
    step_two = (run / "results.jsonl").read_text()
    stale = json.dumps(json.loads(step_two) | {"step": 3})
    (resumed / "results.jsonl").write_text(step_two + stale + "\n" + stale[: len(stale) // 2])
    cfg = make_config(*small_run, *TINY)
    cfg.paths.output_dir = str(resumed)
    with caplog.at_level(logging.INFO, logger="genie_dg"):
        summary = train(cfg)
    assert f"resuming the unfinished run from {resumed / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert summary["steps"] == 4
    assert [r["step"] for r in _records(resumed)] == [2, 4]
    assert (resumed / "results.jsonl").read_text().startswith(step_two)


def test_wandb_run_is_named_after_the_run_and_grouped_by_sweep(small_run, make_config, monkeypatch):
    monkeypatch.setattr(reporting, "sweep_group", lambda: "my_sweep")
    cfg = make_config(
        *[o for o in small_run if o != "logger=csv"],
        "logger=wandb",
        "protocol=sdg",
        "dataset.train_domains=[rot30]",
        "trial_seed=2",
    )
    _, _, trainer, _ = build(cfg)
    (wandb,) = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
    assert wandb._wandb_init["name"] == "rotated_mnist/ERM/GENIE/train=rot30/seed2/hparams0"
    assert wandb._wandb_init["group"] == "my_sweep"
    named = make_config(*small_run, "logger=wandb", "+logger.wandb.name=mine", "logger.wandb.group=g")
    _, _, trainer, _ = build(named)
    assert (trainer.loggers[0]._wandb_init["name"], trainer.loggers[0]._wandb_init["group"]) == ("mine", "g")


def _sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": SECRET,
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
        "PROJECT_ROOT": str(tmp_path),
    }
    command = [
        *(sys.executable, str(ROOT / "train.py"), "-m", *TINY, "logger.wandb.log_model=true"),
        *("dataset.batch_size=8", "backbone.channels=[8,16,32,64]", "~callbacks.rich_progress_bar"),
        # Under paths.log_dir: the sweeper resolves it before Hydra's runtime exists.
        "hydra.sweep.dir=${paths.log_dir}/my_sweep",
        *overrides,
    ]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.e2e  # a sweep of train.py processes, twice
def test_a_sweep_run_again_skips_finished_jobs_and_no_file_holds_the_api_key(tmp_path):
    first = _sweep(tmp_path, "optimizer=adam")
    assert first.returncode == 0, first.stderr[-3000:]
    (job,) = [p for p in (tmp_path / "logs" / "my_sweep").iterdir() if p.is_dir()]
    assert len(job.name) == 12 and int(job.name, 16) >= 0, "the job directory is its config's hash"
    records = (job / "results.jsonl").read_text()
    (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
    wandb_records = read_records(run_file)
    (run,) = [r.run for r in wandb_records if r.HasField("run")]
    assert run.run_group == "my_sweep", "W&B group: the sweep directory's name"
    assert run.display_name == "rotated_mnist/ERM/Adam/test=rot0/seed0/hparams0"
    summary = {
        u.key: json.loads(u.value_json) for r in wandb_records if r.HasField("summary") for u in r.summary.update
    }
    assert summary["target_acc"] == json.loads((job / "summary.json").read_text())["target_acc"]
    (artifact,) = [r.artifact for r in wandb_records if r.HasField("artifact")]
    selected = Path(json.loads((job / "summary.json").read_text())["files"]["checkpoint"]).name
    assert (artifact.type, "selected" in artifact.aliases) == ("model", True)
    assert [entry.path for entry in artifact.manifest.contents] == [selected]

    again = _sweep(tmp_path, "optimizer=adam")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished before: skipping it" in again.stdout + again.stderr
    assert (job / "results.jsonl").read_text() == records
    assert len([p for p in (tmp_path / "logs" / "my_sweep").iterdir() if p.is_dir()]) == 1

    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def _hold_run_lock(run: Path) -> subprocess.Popen:
    """Another process holding ``run``'s lock, as a sweep started beside this one would."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from genie_dg.run_dir import run_lock\n"
            "with run_lock(Path(sys.argv[1])) as holder:\n"
            "    assert holder is None\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_another_process_is_training_is_left_to_it_and_runs_once_that_process_is_gone(
    small_run, make_config, tmp_path, caplog
):
    cfg = make_config(*small_run, *TINY)
    run = tmp_path / "run"
    run.mkdir()
    holder = _hold_run_lock(run)
    try:
        with caplog.at_level(logging.WARNING, logger="genie_dg"):
            assert train(cfg) is None
        assert f"{run} is being trained by another process (pid {holder.pid})" in caplog.text
        assert not (run / "checkpoints").exists() and not (run / "results.jsonl").exists()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    # Killed, not cleanly exited: the kernel dropped its lock all the same.
    summary = train(cfg)
    assert summary is not None and (run / "done").is_file()
    assert [r["step"] for r in _records(run)] == [2, 4]


def test_a_run_that_finished_while_waiting_for_its_lock_is_not_trained_again(
    small_run, make_config, tmp_path, monkeypatch
):
    from genie_dg.run_dir import run_lock

    cfg = make_config(*small_run, *TINY)
    run = tmp_path / "run"
    first = train(cfg)
    records = (run / "results.jsonl").read_text()
    # The first look at the done marker happens before the lock; a second look under it must see it.
    with run_lock(run) as holder:
        assert holder is None
        with run_lock(run) as other:
            assert other == str(os.getpid()), "a second holder in one process is refused too"
    (run / "done").unlink()

    def finish_first(run_dir):
        (run_dir / "done").touch()
        return run_lock(run_dir)

    monkeypatch.setattr(pipeline, "run_lock", finish_first)
    assert train(cfg) == first
    assert (run / "results.jsonl").read_text() == records


def test_only_the_first_process_of_a_launch_locks_its_run(tmp_path, monkeypatch):
    from genie_dg.run_dir import run_lock

    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "RANK"):
        monkeypatch.delenv(key, raising=False)
    with run_lock(tmp_path) as holder:
        assert holder is None
        replicas = (
            {"LOCAL_RANK": "1"},  # a replica Lightning started from this command...
            {"LOCAL_RANK": "1", "SLURM_PROCID": "0"},  # ... inside a SLURM job it did not launch
            {"NODE_RANK": "1", "LOCAL_RANK": "0"},  # its first replica on a second node
            {"WORLD_SIZE": "2", "RANK": "0"},  # torchrun: every rank decides alone, none locks
            {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"},  # srun's tasks likewise
        )
        for env in replicas:
            with monkeypatch.context() as patch:
                for key, value in env.items():
                    patch.setenv(key, value)
                with run_lock(tmp_path) as replica:
                    assert replica is None, env
        with monkeypatch.context() as patch:
            # A submitit job of a SLURM sweep: one task, which locks like a local process.
            patch.setenv("SLURM_NTASKS", "1")
            patch.setenv("SLURM_PROCID", "0")
            with run_lock(tmp_path) as other:
                assert other == str(os.getpid())


def test_a_filesystem_that_cannot_lock_trains_without_the_lock(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from genie_dg.run_dir import run_lock

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="genie_dg.run_dir"), run_lock(tmp_path) as holder:
        assert holder is None
    assert f"cannot lock {tmp_path} (No locks available): training without the lock" in caplog.text
