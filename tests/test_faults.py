"""Preemption: a run stopped by SIGTERM or SIGKILL and started again with the same command ends
with the parameters of a run never stopped. Unsafe input: a checkpoint carrying a pickled payload."""

from __future__ import annotations

import json
import logging
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


def test_the_progress_bar_counts_the_whole_run_after_a_resume():
    from types import SimpleNamespace

    from genie_dg.reporting import StepProgressBar

    bar = StepProgressBar()
    # Resumed at step 200 of 300: the bar's count goes on from 200, so its total is 300.
    bar._trainer = SimpleNamespace(
        max_epochs=-1, max_steps=300, global_step=200, num_training_batches=float("inf"), accumulate_grad_batches=1
    )
    assert bar.total_train_batches == 300


# ----------------------------------------------------------------------------- fault injection

KILLS = 12
# Every third kill waits for a checkpoint being written (its temporary file on disk).
KILL_DURING_CHECKPOINT_WRITE_EVERY = 3


def _slow_checkpoint_writes(monkeypatch_target) -> None:
    """Write each checkpoint in two halves 0.2 s apart, so a kill can land inside a write."""
    import io

    import genie_dg.run_dir as run_dir

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

    monkeypatch_target.setattr(run_dir.torch, "save", slow_save)


def _start_in_child(cfg, slow_writes: bool):
    """``train(cfg)`` in a forked child (no interpreter start-up: kills land in the run itself)."""
    import multiprocessing

    def target() -> None:
        if slow_writes:
            _slow_checkpoint_writes(pytest.MonkeyPatch())
        train(cfg)

    process = multiprocessing.get_context("fork").Process(target=target)
    process.start()
    return process


def _writing_checkpoint(run_dir: Path, since: float) -> bool:
    """Whether a checkpoint write begun after ``since`` (time.time) has its temporary file on disk."""
    try:
        return any(p.stat().st_mtime >= since and p.stat().st_size > 0 for p in (run_dir / "checkpoints").glob(".*.tmp"))
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

    reference = tmp_path / "uninterrupted"
    started = time.monotonic()
    process = _start_in_child(config(reference), slow_writes=True)
    process.join(timeout=300)
    assert process.exitcode == 0
    duration = time.monotonic() - started

    run_dir = tmp_path / "killed"
    cfg = config(run_dir)
    draw = random.Random(0)
    kills, during_writes, attempts = 0, 0, 0
    while not (run_dir / DONE_MARKER).is_file():
        attempts += 1
        assert attempts <= 3 * KILLS, "the run makes no progress between kills"
        since = time.time() - 0.01
        process = _start_in_child(copy.deepcopy(cfg), slow_writes=True)
        if kills < KILLS:
            deadline = time.monotonic() + duration
            if kills % KILL_DURING_CHECKPOINT_WRITE_EVERY == KILL_DURING_CHECKPOINT_WRITE_EVERY - 1:
                while process.is_alive() and not _writing_checkpoint(run_dir, since) and time.monotonic() < deadline:
                    time.sleep(0.002)
            else:
                time.sleep(draw.uniform(0.0, duration))
            if process.is_alive():
                writing = _writing_checkpoint(run_dir, since)
                os.kill(process.pid, signal.SIGKILL)
                process.join(timeout=60)
                kills += 1
                during_writes += writing
                continue
        process.join(timeout=300)
        assert process.exitcode == 0

    assert kills == KILLS and during_writes >= KILLS // KILL_DURING_CHECKPOINT_WRITE_EVERY - 1
    print(f"fault injection: {kills} kills ({during_writes} during a checkpoint write) in {attempts} starts")
    expected_state = torch.load(reference / LAST_CHECKPOINT, weights_only=True)
    state = torch.load(run_dir / LAST_CHECKPOINT, weights_only=True)
    assert state["global_step"] == expected_state["global_step"] == 8
    for name, tensor in expected_state["state_dict"].items():
        assert torch.equal(state["state_dict"][name], tensor), name
    for name in ("results.jsonl", "csv/metrics.csv"):
        assert (run_dir / name).read_text() == (reference / name).read_text(), name
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert summary["domains"] == expected["domains"]
