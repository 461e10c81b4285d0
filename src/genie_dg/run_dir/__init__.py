"""A run directory and what makes it one run's: its configuration, lock, checkpoints and end.

One directory holds one run of one configuration:

- **Owner.** :func:`claim` writes the configuration's :func:`run_key` (``resume_key``) and the
  keyed configuration itself (``run_config.json``) at the first start; a later start with
  another configuration is refused with one line naming the difference (:class:`RunDirCheck`
  does it before Hydra overwrites ``.hydra/``). In a multirun the directory is named by
  :func:`run_key`, so re-running a sweep finds each job's earlier directory.
- **Lock.** A process training in the directory holds :func:`run_lock`, so sweeps started side by
  side share their jobs out instead of training one twice into the same files.
- **Checkpoints.** :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file beside
  it, syncs it and renames it over the old one: a crash at any instant leaves the previous
  checkpoint or the new one, whole. :class:`RunCheckpointState` stores the keyed configuration in
  each checkpoint and flushes the loggers first, so their history is never shorter than the
  checkpoint's. :class:`CheckpointOnSigterm` saves one when SLURM's preemption notice arrives.
- **Resume point.** :func:`resume_point` picks the checkpoint to continue from, checking it first
  (:func:`load_checkpoint`) and falling back to the newest valid one, saying so.
- **End.** :func:`mark_done` writes ``summary.json`` and the :data:`DONE_MARKER`; a finished
  directory is not run again. A start that fails before training leaves nothing behind
  (:func:`discard_failed_start`).
"""

from genie_dg.run_dir.checkpoints import (
    CHECKPOINT_CONFIG_KEY,
    AtomicCheckpointIO,
    CheckpointOnSigterm,
    RunCheckpointState,
    UnreadableCheckpointError,
    atomic_writer,
    check_start_checkpoint,
    load_checkpoint,
    newest_valid_checkpoint,
    write_atomically,
)
from genie_dg.run_dir.config import config_difference, keyed_config, run_key
from genie_dg.run_dir.lifecycle import (
    CHECKPOINT_DIR,
    DONE_MARKER,
    LAST_CHECKPOINT,
    RESUME_KEY_FILE,
    RUN_CONFIG_FILE,
    RUN_LOCK_FILE,
    SUMMARY_FILE,
    WANDB_ID_FILE,
    ResumePoint,
    RunDirCheck,
    claim,
    discard_failed_start,
    is_done,
    latest_run,
    locks_its_run,
    mark_done,
    prepare_output_dir,
    read_summary,
    refuse_other_config,
    resume_point,
    run_lock,
    wandb_run_id,
)

__all__ = [
    "CHECKPOINT_CONFIG_KEY",
    "CHECKPOINT_DIR",
    "DONE_MARKER",
    "LAST_CHECKPOINT",
    "RESUME_KEY_FILE",
    "RUN_CONFIG_FILE",
    "RUN_LOCK_FILE",
    "SUMMARY_FILE",
    "WANDB_ID_FILE",
    "AtomicCheckpointIO",
    "CheckpointOnSigterm",
    "ResumePoint",
    "RunCheckpointState",
    "RunDirCheck",
    "UnreadableCheckpointError",
    "atomic_writer",
    "check_start_checkpoint",
    "claim",
    "config_difference",
    "discard_failed_start",
    "is_done",
    "keyed_config",
    "latest_run",
    "load_checkpoint",
    "locks_its_run",
    "mark_done",
    "newest_valid_checkpoint",
    "prepare_output_dir",
    "read_summary",
    "refuse_other_config",
    "resume_point",
    "run_key",
    "run_lock",
    "wandb_run_id",
    "write_atomically",
]
