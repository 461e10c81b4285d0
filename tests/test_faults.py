"""Preemption: a run stopped by SIGTERM or SIGKILL and started again with the same command ends
with the parameters of a run never stopped. Unsafe input: a checkpoint carrying a pickled payload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genie_dg.errors import UserInputError
from genie_dg.pipeline import train
from genie_dg.sweep import DONE_MARKER, LAST_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
RUN = ("trainer.deterministic=true", "trainer.max_steps=8", "trainer.val_check_interval=2")


def _command(run_dir: Path, small_run: tuple[str, ...]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *small_run, *RUN, f"hydra.run.dir={run_dir}"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "PROJECT_ROOT": str(tmp_path)}


def _train(run_dir: Path, tmp_path: Path, small_run: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(run_dir, small_run), cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300
    )


def _outcome(run_dir: Path) -> tuple[dict[str, torch.Tensor], str, list[dict]]:
    """The final parameters, every validation's record, and the tested accuracies of a finished run."""
    state = torch.load(run_dir / LAST_CHECKPOINT, weights_only=True)
    assert state["global_step"] == 8
    tested = json.loads((run_dir / "summary.json").read_text())["domains"]
    return state["state_dict"], (run_dir / "results.jsonl").read_text(), tested


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_run) -> tuple[dict[str, torch.Tensor], str, list[dict]]:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    result = _train(tmp_path / "run", tmp_path, small_run)
    assert result.returncode == 0, result.stderr[-4000:]
    return _outcome(tmp_path / "run")


@pytest.mark.parametrize(
    "signum, restart",
    [(signal.SIGTERM, "same directory"), (signal.SIGKILL, "same directory"), (signal.SIGKILL, "ckpt_path=last")],
    ids=["SIGTERM", "SIGKILL", "SIGKILL-ckpt_path=last-new-directory"],
)
def test_a_run_stopped_by_a_signal_resumes_to_the_parameters_of_an_uninterrupted_one(
    signum, restart, uninterrupted, small_run, tmp_path
):
    run_dir = tmp_path / "runs" / "first"
    process = subprocess.Popen(
        _command(run_dir, small_run),
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # The first validation (step 2) writes last.ckpt: training is under way, six steps remain.
    deadline = time.monotonic() + 120
    while not (run_dir / LAST_CHECKPOINT).is_file():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    process.send_signal(signum)
    output = process.communicate(timeout=120)[0]
    assert not (run_dir / DONE_MARKER).exists(), "the run finished before the signal"
    if signum == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM, output[-4000:]
        # Saved by genie_dg.faults at the step boundary where Lightning stopped, validation or not.
        step = torch.load(run_dir / LAST_CHECKPOINT, weights_only=True)["global_step"]
        assert f"SIGTERM: saved step {step} to {run_dir / LAST_CHECKPOINT}" in output
        assert 2 <= step < 8
    else:
        assert process.returncode == -signal.SIGKILL

    if restart == "same directory":
        resumed = _train(run_dir, tmp_path, small_run)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert "resuming the unfinished run from" in resumed.stdout + resumed.stderr
    else:
        # As a restart with Hydra's default time-stamped run directory: a sibling of the first.
        second = tmp_path / "runs" / "second"
        resumed = _train(second, tmp_path, (*small_run, "ckpt_path=last"))
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert f"ckpt_path=last: continuing the unfinished run in {run_dir}" in resumed.stdout + resumed.stderr
        assert (second / "continued_in").read_text().strip() == str(run_dir)
        assert not (second / LAST_CHECKPOINT).exists(), "training continued in the first directory"
    assert (run_dir / DONE_MARKER).is_file()
    weights, records, tested = _outcome(run_dir)
    expected_weights, expected_records, expected_tested = uninterrupted
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(weights[name], tensor), name
    assert records == expected_records, "every validation recorded once, with the same accuracies"
    assert tested == expected_tested


class _Payload:
    """Pickles as a call that leaves a file behind: proof of whether loading ran it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_a_pickled_payload_is_refused_unrun(small_run, make_config, tmp_path):
    marker = tmp_path / "payload_ran"
    checkpoint = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, checkpoint)
    cfg = make_config(*small_run, *RUN, f"ckpt_path={checkpoint}")
    with pytest.raises(UserInputError, match=r"refused as unsafe") as refused:
        train(cfg)
    assert "\n" not in str(refused.value)
    assert not marker.exists(), "the payload ran"


def test_a_missing_checkpoint_path_is_refused_before_training(small_run, make_config, tmp_path):
    cfg = make_config(*small_run, *RUN, f"ckpt_path={tmp_path / 'nope.ckpt'}")
    with pytest.raises(UserInputError, match=r"nope.ckpt is not a file.*ckpt_path=last"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_ckpt_path_last_takes_the_newest_run_of_the_same_config(small_run, make_config, tmp_path):
    import os

    from omegaconf import open_dict

    from genie_dg.pipeline import resume_point
    from genie_dg.sweep import RESUME_KEY_FILE

    def start(name: str, *overrides: str):
        cfg = make_config(*small_run, *RUN, "ckpt_path=last", *overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "runs" / name)
        Path(cfg.paths.output_dir).mkdir(parents=True)
        return cfg

    def leave_checkpoint(cfg, age: int, done: bool = False) -> Path:
        run = Path(cfg.paths.output_dir)
        resume_point(cfg, run)
        (run / LAST_CHECKPOINT).parent.mkdir(parents=True)
        (run / LAST_CHECKPOINT).write_bytes(b"")
        os.utime(run / LAST_CHECKPOINT, (1e9 - age, 1e9 - age))
        if done:
            (run / DONE_MARKER).touch()
        return run

    leave_checkpoint(start("other_config", "trainer.max_steps=9"), age=0)
    older = leave_checkpoint(start("older"), age=20)
    newer = leave_checkpoint(start("newer"), age=10, done=True)
    assert (older / RESUME_KEY_FILE).read_text() == (newer / RESUME_KEY_FILE).read_text()

    fresh = start("fresh")
    assert resume_point(fresh, Path(fresh.paths.output_dir)) == (newer, str(newer / LAST_CHECKPOINT))
    assert fresh.paths.output_dir == str(newer), "the run's files go to the directory it continues"
    assert not (tmp_path / "runs" / "fresh" / "continued_in").exists(), "a finished run is not continued"
    (newer / DONE_MARKER).unlink()
    again = start("again")
    assert resume_point(again, Path(again.paths.output_dir))[0] == newer
    assert (tmp_path / "runs" / "again" / "continued_in").read_text().strip() == str(newer)


def test_a_sweep_killed_halfway_keeps_its_finished_runs_and_completes_when_run_again(small_run, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *small_run,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trial_seed=0,1,2",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not list(sweep_dir.glob(f"*/{DONE_MARKER}")):
        assert process.poll() is None and time.monotonic() < deadline, "no job finished"
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=60)
    finished = {
        marker.parent: (marker.parent / "summary.json").read_bytes() for marker in sweep_dir.glob(f"*/{DONE_MARKER}")
    }
    assert 1 <= len(finished) < 3, "the kill came after the whole sweep"
    stamps = {run: (run / "results.jsonl").stat().st_mtime_ns for run in finished}

    again = subprocess.run(command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    runs = sorted(marker.parent for marker in sweep_dir.glob(f"*/{DONE_MARKER}"))
    assert len(runs) == 3
    for run, summary in finished.items():
        assert (run / "summary.json").read_bytes() == summary, "a finished run was run again"
        assert (run / "results.jsonl").stat().st_mtime_ns == stamps[run]
        assert f"{run} finished before: skipping it" in again.stdout + again.stderr
    seeds = sorted(json.loads((run / "summary.json").read_text())["trial_seed"] for run in runs)
    assert seeds == [0, 1, 2]

    # ckpt_path=last does not change a job's directory: the finished sweep is skipped whole.
    last = subprocess.run(
        [*command, "ckpt_path=last"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert last.returncode == 0, last.stderr[-4000:]
    assert sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name != ".hydra") == runs
    assert (last.stdout + last.stderr).count("finished before: skipping it") == 3


def test_a_requeued_run_started_from_a_file_continues_from_its_own_last_checkpoint(small_run, make_config, tmp_path):
    from genie_dg.pipeline import resume_point

    start_file = tmp_path / "pretrained.ckpt"
    start_file.write_bytes(b"")
    cfg = make_config(*small_run, *RUN, f"ckpt_path={start_file}")
    run = Path(cfg.paths.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    assert resume_point(cfg, run) == (run, str(start_file))
    (run / LAST_CHECKPOINT).parent.mkdir(parents=True)
    (run / LAST_CHECKPOINT).write_bytes(b"")
    assert resume_point(cfg, run) == (run, str(run / LAST_CHECKPOINT))
