"""Issue 17, inside a multirun: a job whose start fails removes the folder it created, and only
that one; the sweep stops at it with the one ``error:`` line and status 2, as it always has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from genie_dg.run_dir import DONE_MARKER

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
# Two steps, validated once on one batch per evaluation set; job folders named by job number.
TINY = (
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "dataset.eval_batch_size=64",
    "+trainer.limit_val_batches=1",
    "hydra.sweep.subdir=job${hydra.job.num}",
)


def _sweep(small_run: tuple[str, ...], tmp_path: Path, seeds: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *small_run,
        *TINY,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"seed={seeds}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "PROJECT_ROOT": str(tmp_path)}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_a_multirun_job_that_fails_to_start_removes_only_its_own_new_folder(small_run, tmp_path):
    sweep = tmp_path / "sweep"
    failed = _sweep(small_run, tmp_path, "0,-1,1")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1].startswith("error: seed=-1: a seed is a whole number")
    assert "Traceback" not in failed.stderr
    # job0 finished and keeps its folder; job1's failed start left none; job2 never started.
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["job0"]
    assert (sweep / "job0" / DONE_MARKER).is_file()

    # A job folder that was there before the sweep started is not this start's: it stays, even
    # holding nothing but what a start writes.
    earlier = sweep / "job1" / ".hydra"
    earlier.mkdir(parents=True)
    (earlier / "overrides.yaml").write_text("- seed=-1\n")
    again = _sweep(small_run, tmp_path, "0,-1")
    assert again.returncode == 2, again.stderr[-3000:]
    assert (earlier / "overrides.yaml").is_file(), "a folder from before the sweep was removed"
    assert (sweep / "job0" / DONE_MARKER).is_file()
