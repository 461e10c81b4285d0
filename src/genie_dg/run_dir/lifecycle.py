"""A run directory's life: claimed by one configuration, locked while a process trains in it,
resumed from its newest valid checkpoint, ended by a summary and a done marker, removed when
a start fails before training."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import string
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from hydra.experimental.callback import Callback as HydraCallback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, open_dict

from genie_dg.errors import UserInputError
from genie_dg.run_dir.checkpoints import (
    UnreadableCheckpointError,
    load_checkpoint,
    newest_valid_checkpoint,
    remove_stale_temporaries,
    write_atomically,
)
from genie_dg.run_dir.config import config_difference, keyed_config, run_key

log = logging.getLogger(__name__)

DONE_MARKER = "done"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = Path(CHECKPOINT_DIR) / "last.ckpt"
# Holds the run's run_key, so `ckpt_path=last` can find earlier runs of the same config.
RESUME_KEY_FILE = "resume_key"
# The keyed config the run key hashes: names what differs when another config meets this run.
RUN_CONFIG_FILE = "run_config.json"
RUN_LOCK_FILE = ".run_lock"
# The W&B run id of this directory's run: a resumed run continues the same W&B run.
WANDB_ID_FILE = "wandb_id"


def claim(output_dir: Path, cfg: DictConfig) -> None:
    """Make ``output_dir`` the directory of ``cfg``'s run, or refuse if it belongs to another."""
    refuse_other_config(output_dir, cfg)
    if not (output_dir / RUN_CONFIG_FILE).is_file():
        write_atomically(output_dir / RUN_CONFIG_FILE, json.dumps(keyed_config(cfg), indent=1, sort_keys=True))
    write_atomically(output_dir / RESUME_KEY_FILE, run_key(cfg))


def refuse_other_config(output_dir: Path, cfg: DictConfig) -> None:
    """Raise naming the difference when ``output_dir`` holds a run of another config."""
    key_file, config_file = output_dir / RESUME_KEY_FILE, output_dir / RUN_CONFIG_FILE
    if not key_file.is_file():
        return
    key = run_key(cfg)
    saved_key = key_file.read_text().strip()
    if saved_key == key:
        return
    difference = None
    if config_file.is_file():
        try:
            difference = config_difference(json.loads(config_file.read_text()), keyed_config(cfg), "there")
        except json.JSONDecodeError:
            difference = None
    raise UserInputError(
        f"{output_dir} holds a run of another configuration ({difference or f'run key {saved_key}, this one {key}'}); "
        "choose another hydra.run.dir (or leave it to Hydra's time-stamped default), or repeat the "
        "old run's settings to continue it"
    )


def locks_its_run() -> bool:
    """Whether this process locks its run directory: yes when it is the only process of its
    launch, or the first of the DDP replicas Lightning starts from it (Lightning gives the others
    ``LOCAL_RANK`` / ``NODE_RANK`` >= 1, and they share the first one's directory). Processes that
    torchrun (``WORLD_SIZE``) or SLURM (``SLURM_NTASKS``) start several at a time decide each on
    its own whether to train, so none of them locks: one that left would hang the others."""
    env = os.environ
    if int(env.get("LOCAL_RANK", 0)) or int(env.get("NODE_RANK", 0)):
        return False
    return all(int(env.get(key, 1)) <= 1 for key in ("WORLD_SIZE", "SLURM_NTASKS"))


@contextmanager
def run_lock(run_dir: Path) -> Iterator[str | None]:
    """Hold an exclusive lock on ``run_dir`` for the block. Yields None when this process holds
    it (or does not lock: :func:`locks_its_run`), or else the holder's pid (as written in the
    lock file) and holds nothing.

    ``flock``: the kernel drops the lock when its holder exits, however it exits, so a killed
    run leaves no lock behind on a local disk (a network filesystem may keep a crashed node's
    lock until its lease ends). Where the filesystem cannot lock at all, the run goes on unlocked."""
    if not locks_its_run():
        yield None
        return
    with open(run_dir / RUN_LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            yield lock.read().strip() or "unknown"
            return
        except OSError as err:
            log.warning("cannot lock %s (%s): training without the lock", run_dir, err.strerror or err)
            yield None
            return
        try:
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            yield None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def latest_run(runs_dir: Path, key: str, exclude: Path | None = None) -> Path | None:
    """The directory under ``runs_dir`` whose :data:`RESUME_KEY_FILE` holds ``key`` and which has a
    last checkpoint, with the newest checkpoint (finished or not); None if there is none.
    Directories this user cannot read are passed over."""
    found = []
    try:
        runs = list(runs_dir.iterdir()) if runs_dir.is_dir() else []
    except OSError:
        runs = []
    for run in runs:
        try:
            marker, checkpoint = run / RESUME_KEY_FILE, run / LAST_CHECKPOINT
            if run != exclude and marker.is_file() and checkpoint.is_file() and marker.read_text().strip() == key:
                found.append((checkpoint.stat().st_mtime, str(run)))
        except OSError:
            continue
    return Path(max(found)[1]) if found else None


class ResumePoint(NamedTuple):
    """Where a run trains and the checkpoint it continues from (None: from scratch);
    ``start_file``: the checkpoint is a user's ``ckpt_path``, not this run's own."""

    output_dir: Path
    ckpt_path: str | None
    start_file: bool = False


def own_checkpoint(output_dir: Path) -> str | None:
    """This directory's last checkpoint if it loads, else the newest one that does (saying so)."""
    checkpoints = output_dir / CHECKPOINT_DIR
    if locks_its_run():
        # Only the process that owns the directory: a DDP replica starts while rank 0 may write.
        remove_stale_temporaries(checkpoints)
    own = output_dir / LAST_CHECKPOINT
    if not own.is_file():
        return None
    try:
        load_checkpoint(own)
    except UnreadableCheckpointError as err:
        fallback = newest_valid_checkpoint(checkpoints, exclude=own)
        log.warning("%s: resuming from %s instead", err, fallback or "the start (no valid checkpoint is left)")
        # Left in place (the next validation replaces it): DDP replicas, which decide their
        # resume point each on its own, must all see it and fall back alike.
        return None if fallback is None else str(fallback)
    log.info("resuming the unfinished run from %s", own)
    return str(own)


def resume_point(cfg: DictConfig, output_dir: Path) -> ResumePoint:
    """The run directory to train in and the checkpoint to resume from.

    - this directory's own ``last.ckpt`` if an earlier start left one, whatever ``ckpt_path``
      says (a job requeued after starting from a file continues, not starts over); if it does
      not load, the newest checkpoint beside it that does.
    - ``ckpt_path=last``: that, or else the newest run of the same config (same :func:`run_key`)
      among this directory's siblings, e.g. an earlier ``python train.py ...`` that Hydra gave
      another time-stamped directory. Training then continues in that directory
      (``paths.output_dir`` is pointed there), so its records and checkpoints stay in one place;
      this directory keeps Hydra's files and a ``continued_in`` note. If that run finished, it is
      reported and nothing trains. With no such run it starts from scratch.
    - any other value: that checkpoint file (relative to where the command was started), which
      must exist, when the directory has no ``last.ckpt`` yet.
    """
    claim(output_dir, cfg)
    ckpt_path = cfg.get("ckpt_path")
    explicit = None if ckpt_path in (None, "last") else Path(to_absolute_path(str(ckpt_path)))
    if explicit is not None and not explicit.is_file():
        raise UserInputError(
            f"ckpt_path={ckpt_path} is not a file; pass a checkpoint (e.g. <run dir>/{LAST_CHECKPOINT}) "
            "or ckpt_path=last to continue the newest run of this config"
        )
    own = own_checkpoint(output_dir)
    if own is not None:
        # Also over an explicit ckpt_path: a requeued job has moved past the file it started from.
        return ResumePoint(output_dir, own)
    if explicit is not None:
        return ResumePoint(output_dir, str(explicit), start_file=True)
    if ckpt_path is None:
        return ResumePoint(output_dir, None)
    earlier = latest_run(output_dir.parent, run_key(cfg), exclude=output_dir)
    if earlier is None:
        log.warning("ckpt_path=last: no earlier run of this config under %s; starting from scratch", output_dir.parent)
        return ResumePoint(output_dir, None)
    prepare_output_dir(earlier)
    if not is_done(earlier):
        log.info("ckpt_path=last: continuing the unfinished run in %s", earlier)
        write_atomically(output_dir / "continued_in", f"{earlier}\n")
    with open_dict(cfg):
        cfg.paths.output_dir = str(earlier)
    return ResumePoint(earlier, own_checkpoint(earlier))


def prepare_output_dir(output_dir: Path) -> None:
    """Create the run directory and prove it writable before any work, so an unwritable path
    or a full disk fails at start rather than at the first checkpoint."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # A unique name: sweeps started side by side share hydra.sweep.dir.
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write_probe") as probe:
            probe.write(b"0" * 4096)
            probe.flush()
    except OSError as err:
        raise UserInputError(
            f"cannot write the run directory {output_dir} ({err.strerror or err}); free disk space "
            "or point paths.log_dir (or hydra.run.dir) at a writable place"
        ) from err


# Run directories this process created (RunDirCheck): a failed start removes only those.
_CREATED_HERE: set[Path] = set()
# What each sweep directory held when this process's multirun started (RunDirCheck): a job
# directory that was not there then is one this process's launcher created.
_SWEEP_ENTRIES: dict[Path, frozenset[str]] = {}


class RunDirCheck(HydraCallback):
    """Hydra callback, before Hydra creates (or writes into) the run directory: prove it
    writable, and refuse a ``hydra.run.dir`` that holds a run of another configuration before
    Hydra overwrites that run's ``.hydra/`` files. Each problem is one ``error:`` line (exit
    status 2), not a traceback from inside Hydra."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        if not run_dir.exists():
            _CREATED_HERE.add(run_dir.resolve())
        self._exit_on_error(lambda: refuse_other_config(run_dir, config), "hydra.run.dir")
        self._exit_on_error(lambda: prepare_output_dir(run_dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        self._exit_on_error(lambda: prepare_output_dir(sweep_dir), "hydra.sweep.dir")
        _SWEEP_ENTRIES[sweep_dir.resolve()] = frozenset(entry.name for entry in sweep_dir.iterdir())

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A multirun job: Hydra has just created its directory (or found it, when the sweep runs
        again); remember it as this process's when it was not in the sweep directory at the
        start, so a failed start of this job may remove it (:func:`discard_failed_start`). A
        launcher that runs jobs in other processes leaves their directories in place."""
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        before = _SWEEP_ENTRIES.get(sweep_dir)
        job_dir = Path(config.hydra.runtime.output_dir).resolve()
        if before is None or sweep_dir not in job_dir.parents:
            return
        if job_dir.relative_to(sweep_dir).parts[0] not in before:
            _CREATED_HERE.add(job_dir)

    @staticmethod
    def _exit_on_error(check: Any, key: str) -> None:
        try:
            check()
        except UserInputError as err:
            print(f"error: {err} ({key})", file=sys.stderr)
            raise SystemExit(2) from None


# What a start writes before it trains; a directory holding only these holds no run yet.
STARTUP_FILES = (".hydra", RESUME_KEY_FILE, RUN_CONFIG_FILE, RUN_LOCK_FILE, WANDB_ID_FILE, "config_resolved.yaml")


def discard_failed_start(output_dir: Path, task_name: str = "train") -> bool:
    """Remove the run directory a failed start created (a single run's, or a multirun job's), if
    nothing of a run is in it yet (no checkpoint, record or summary) and no other process holds
    its lock: a mistake leaves no folder behind. True if removed."""
    output_dir = output_dir.resolve()
    if output_dir not in _CREATED_HERE or not output_dir.is_dir():
        return False
    ours = set(STARTUP_FILES) | {f"{task_name}.log", "csv", "wandb"}
    if any(entry.name not in ours for entry in output_dir.iterdir()):
        return False
    with run_lock(output_dir) as holder:
        if holder is not None:
            return False
        shutil.rmtree(output_dir, ignore_errors=True)
    _CREATED_HERE.discard(output_dir)
    return True


def is_done(output_dir: Path) -> bool:
    return (output_dir / DONE_MARKER).is_file()


def mark_done(output_dir: Path, summary: dict[str, Any]) -> None:
    """Write the run's summary, then the marker that says it finished (in that order: a marker
    always has its summary)."""
    write_atomically(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    write_atomically(output_dir / DONE_MARKER, "")


def read_summary(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / SUMMARY_FILE).read_text())


def wandb_run_id(output_dir: Path) -> str:
    """The W&B run id of this directory's run, drawn at its first start and kept, so every
    resumption logs into the same W&B run."""
    path = output_dir / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    # W&B's own id shape: eight lowercase letters and digits.
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_atomically(path, run_id)
    return run_id
