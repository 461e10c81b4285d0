"""GENIE through Lightning: exact resume from a checkpoint, identical data-parallel replicas."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genie_dg.pipeline import build

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
RESUMABLE = ("trainer.val_check_interval=3", "trainer.deterministic=true")


def _fit(make_config, output_dir: Path, *overrides: str, ckpt_path: str | None = None):
    cfg = make_config(*RESUMABLE, *overrides)
    cfg.paths.output_dir = str(output_dir)
    datamodule, model, trainer, _ = build(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, trainer


def test_resumed_genie_run_ends_bitwise_equal_to_an_uninterrupted_one(small_run, make_config, tmp_path):
    make_config = functools.partial(make_config, *small_run)
    straight, _ = _fit(make_config, tmp_path / "straight", "trainer.max_steps=6")
    _fit(make_config, tmp_path / "first", "trainer.max_steps=3")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 3 and state["optimizer_states"][0]["generator_states"]
    resumed, trainer = _fit(make_config, tmp_path / "resumed", "trainer.max_steps=6", ckpt_path=str(last))
    assert trainer.global_step == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# DANN, Fish, SagNet: manual optimization, under which Lightning turns off DDP's buffer broadcast;
# DANN's discriminator steps also leave the network unused, which plain DDP refuses.
@pytest.mark.parametrize("algorithm", ["erm", "dann", "fish", "sagnet"])
def test_ddp_cpu_replicas_stay_bitwise_identical(small_run, tmp_path, algorithm):
    out = tmp_path / "digests"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "WANDB_MODE": "offline"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "trainer=ddp_cpu",
            f"algorithm={algorithm}",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            *small_run,
            "+callbacks.replica_digest._target_=helpers.replica_check.ReplicaDigest",
            f"+callbacks.replica_digest.out_dir={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a replica that leaves early leaves the other waiting: fail, not hang
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = (out / "rank0.txt").read_text().split()
    rank1 = (out / "rank1.txt").read_text().split()
    assert rank0[1:3] == ["4", "2"], "four steps on a world of two"
    assert rank0[0] == rank1[0], "parameters, algorithm buffers or GENIE generator state differ between ranks"
    assert result.stdout.count("run_dir:") == 1, "the summary is printed once, by rank 0"
    assert "sync_dist" not in result.stderr, "Lightning should know the accuracies are synced"
