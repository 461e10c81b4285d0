"""Preemption: a run stopped by SIGTERM or SIGKILL (once, or many times at random instants, inside
checkpoint writes too) and started again ends with the parameters, records and CSV history of a
run never stopped. Unsafe input: a checkpoint carrying a pickled payload."""

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
from genie_dg.run_dir import DONE_MARKER, LAST_CHECKPOINT

pytestmark = pytest.mark.e2e

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


def _outcome(run_dir: Path) -> tuple[dict[str, torch.Tensor], str, list[dict], str]:
    """The final parameters, every validation's record, the tested accuracies and the CSV
    history of a finished run."""
    state = torch.load(run_dir / LAST_CHECKPOINT, weights_only=True)
    assert state["global_step"] == 8
    tested = json.loads((run_dir / "summary.json").read_text())["domains"]
    history = (run_dir / "csv" / "metrics.csv").read_text()
    return state["state_dict"], (run_dir / "results.jsonl").read_text(), tested, history


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_run) -> tuple[dict[str, torch.Tensor], str, list[dict], str]:
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
        # Saved by genie_dg.run_dir.CheckpointOnSigterm at the step boundary where Lightning stopped, validation or not.
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
    weights, records, tested, history = _outcome(run_dir)
    expected_weights, expected_records, expected_tested, expected_history = uninterrupted
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(weights[name], tensor), name
    assert records == expected_records, "every validation recorded once, with the same accuracies"
    assert tested == expected_tested
    assert history == expected_history, "the CSV history is whole: every row once, none lost at the resume"


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

    from genie_dg.run_dir import RESUME_KEY_FILE, ResumePoint, resume_point

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
        torch.save({"state_dict": {}, "global_step": 2}, run / LAST_CHECKPOINT)
        os.utime(run / LAST_CHECKPOINT, (1e9 - age, 1e9 - age))
        if done:
            (run / DONE_MARKER).touch()
        return run

    leave_checkpoint(start("other_config", "trainer.max_steps=9"), age=0)
    older = leave_checkpoint(start("older"), age=20)
    newer = leave_checkpoint(start("newer"), age=10, done=True)
    assert (older / RESUME_KEY_FILE).read_text() == (newer / RESUME_KEY_FILE).read_text()

    fresh = start("fresh")
    assert resume_point(fresh, Path(fresh.paths.output_dir)) == ResumePoint(newer, str(newer / LAST_CHECKPOINT))
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
    seeds = sorted(json.loads((run / "summary.json").read_text())["run"]["trial_seed"] for run in runs)
    assert seeds == [0, 1, 2]

    # ckpt_path=last does not change a job's directory: the finished sweep is skipped whole.
    last = subprocess.run(
        [*command, "ckpt_path=last"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert last.returncode == 0, last.stderr[-4000:]
    assert sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name != ".hydra") == runs
    assert (last.stdout + last.stderr).count("finished before: skipping it") == 3


def test_a_requeued_run_started_from_a_file_continues_from_its_own_last_checkpoint(small_run, make_config, tmp_path):
    from genie_dg.run_dir import ResumePoint, resume_point

    start_file = tmp_path / "pretrained.ckpt"
    start_file.write_bytes(b"")
    cfg = make_config(*small_run, *RUN, f"ckpt_path={start_file}")
    run = Path(cfg.paths.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    assert resume_point(cfg, run) == ResumePoint(run, str(start_file), start_file=True)
    (run / LAST_CHECKPOINT).parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 2}, run / LAST_CHECKPOINT)
    assert resume_point(cfg, run) == ResumePoint(run, str(run / LAST_CHECKPOINT))


# ----------------------------------------------------------------------------- fault injection

KILLS = 10
# A random kill comes within this fraction of an uninterrupted run's time after a start.
RANDOM_KILL_WITHIN = 0.6
# Every third kill waits for a checkpoint being written (its temporary file on disk).
KILL_DURING_CHECKPOINT_WRITE_EVERY = 3


def _slow_checkpoint_writes(monkeypatch_target) -> None:
    """Write each checkpoint in two halves 0.2 s apart, so a kill can land inside a write."""
    import io

    real_save = torch.save

    def slow_save(obj, file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            return real_save(obj, file, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        time.sleep(0.2)
        file.write(data[len(data) // 2 :])

    monkeypatch_target.setattr(torch, "save", slow_save)


def _train_in_child(cfg, slow_writes: bool) -> None:
    if slow_writes:
        _slow_checkpoint_writes(pytest.MonkeyPatch())
    train(cfg)


def _start_in_child(cfg, slow_writes: bool = True, target=_train_in_child):
    """``train(cfg)`` in a child forked from a server that imported genie-dg once (no interpreter
    start-up per run, so kills land in the run itself; forked from a clean process, not pytest)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["genie_dg.pipeline"])
    process = context.Process(target=target, args=(cfg, slow_writes))
    process.start()
    return process


def _nothing(*args) -> None:
    pass


def _writing_checkpoint(run_dir: Path, since: float) -> bool:
    """Whether a checkpoint write begun after ``since`` (time.time) has its temporary file on disk."""
    try:
        temporaries = (run_dir / "checkpoints").glob(".*.tmp")
        return any(p.stat().st_mtime >= since and p.stat().st_size > 0 for p in temporaries)
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_run_killed_at_random_instants_many_times_ends_as_an_uninterrupted_one(small_run, make_config, tmp_path):
    import copy
    import random

    def config(run_dir: Path):
        cfg = make_config(*small_run, *RUN)
        cfg.paths.output_dir = str(run_dir)
        return cfg

    # The fork server imports genie-dg once, before the reference run is timed.
    warm_up = _start_in_child(None, target=_nothing)
    warm_up.join(timeout=300)
    reference = tmp_path / "uninterrupted"
    started = time.monotonic()
    process = _start_in_child(config(reference), slow_writes=True)
    process.join(timeout=300)
    assert process.exitcode == 0
    duration = time.monotonic() - started

    draw = random.Random(0)
    kills, during_writes, starts, trials = 0, 0, 0, 0
    # A run that finishes before the kills are spent is checked, and another one is killed.
    while kills < KILLS:
        trials += 1
        run_dir = tmp_path / f"killed{trials}"
        cfg = config(run_dir)
        while not (run_dir / DONE_MARKER).is_file():
            starts += 1
            since = time.time() - 0.01
            process = _start_in_child(copy.deepcopy(cfg), slow_writes=True)
            if kills < KILLS:
                deadline = time.monotonic() + duration
                if kills % KILL_DURING_CHECKPOINT_WRITE_EVERY == KILL_DURING_CHECKPOINT_WRITE_EVERY - 1:
                    while process.is_alive() and time.monotonic() < deadline:
                        if _writing_checkpoint(run_dir, since):
                            break
                        time.sleep(0.002)
                else:
                    # Within the first part of a run's time, so that most starts are cut short.
                    time.sleep(draw.uniform(0.0, RANDOM_KILL_WITHIN * duration))
                if process.is_alive():
                    writing = _writing_checkpoint(run_dir, since)
                    os.kill(process.pid, signal.SIGKILL)
                    process.join(timeout=60)
                    kills += 1
                    during_writes += writing
                    print(f"kill {kills} of run {trials}: {'inside a checkpoint write' if writing else 'at random'}")
                    continue
            process.join(timeout=300)
            assert process.exitcode == 0
        _assert_same_outcome(run_dir, reference)
    print(f"fault injection: {kills} kills ({during_writes} inside a checkpoint write), {starts} starts, {trials} runs")
    assert during_writes >= KILLS // KILL_DURING_CHECKPOINT_WRITE_EVERY - 1


def _assert_same_outcome(run_dir: Path, reference: Path) -> None:
    """Final parameters, records, CSV history and tested accuracies equal the reference run's."""
    expected_state = torch.load(reference / LAST_CHECKPOINT, weights_only=True)
    state = torch.load(run_dir / LAST_CHECKPOINT, weights_only=True)
    assert state["global_step"] == expected_state["global_step"] == 8
    for name, tensor in expected_state["state_dict"].items():
        assert torch.equal(state["state_dict"][name], tensor), name
    for name in ("results.jsonl", "csv/metrics.csv"):
        assert (run_dir / name).read_text() == (reference / name).read_text(), name
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert summary["domains"] == expected["domains"]
