"""Checkpoints and records written whole or not at all, checked before a run resumes from them.

:func:`atomic_writer` writes to a temporary file in the target's folder (a rename never crosses
filesystems), syncs it and renames it over the target; :class:`AtomicCheckpointIO` makes every
Lightning checkpoint save go that way. :func:`load_checkpoint` refuses, in one line, a file that
is empty, cut short, not a checkpoint or unsafe to unpickle.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from genie_dg.errors import UserInputError
from genie_dg.run_dir.config import config_difference, keyed_config

log = logging.getLogger(__name__)

# Where a checkpoint keeps the keyed config of the run that wrote it.
CHECKPOINT_CONFIG_KEY = "genie_dg_config"


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a crash right after keeps it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: Path, mode: str = "w") -> Iterator[Any]:
    """A file object whose content replaces ``path`` whole when the block ends, or not at all:
    a temporary file in the same folder (a rename never crosses filesystems), synced, renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_atomically(path: Path, text: str) -> None:
    with atomic_writer(path) as file:
        file.write(text)


def remove_stale_temporaries(directory: Path) -> None:
    """Delete what a crash inside :func:`atomic_writer` left in ``directory``."""
    for stale in directory.glob(".*.tmp") if directory.is_dir() else ():
        stale.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with each local save made atomic (:func:`atomic_writer`).

    Lightning's own save writes the file in place, so a kill or a full disk during a save
    leaves a truncated ``last.ckpt`` that every restart then fails to load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(str(path)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_writer(Path(path), "wb") as file:
            torch.save(checkpoint, file)


class UnreadableCheckpointError(UserInputError):
    """A checkpoint file that is empty, truncated, not a checkpoint, or unsafe to load."""


def load_checkpoint(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU as tensors and plain containers only, or raise one
    line saying why it cannot be used (``what`` names it in the message)."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise UnreadableCheckpointError(f"{what} {path} cannot be read ({err.strerror or err})") from err
    # torch.save writes a zip archive, its index at the end: a cut file has none.
    if not zipfile.is_zipfile(path):
        state = "empty" if size == 0 else f"truncated or not a checkpoint ({size} bytes)"
        raise UnreadableCheckpointError(f"{what} {path} is {state}; pass a checkpoint written by genie-dg")
    try:
        # weights_only: loading a checkpoint must never run code pickled into it.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise UnreadableCheckpointError(
            f"{what} {path} holds pickled objects beyond tensors and plain containers and is "
            "refused as unsafe; pass a checkpoint written by genie-dg"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableCheckpointError(f"{what} {path} is damaged ({reason})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UnreadableCheckpointError(f"{what} {path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def newest_valid_checkpoint(directory: Path, exclude: Path | None = None) -> Path | None:
    """The most recently written loadable checkpoint in ``directory``, or None."""
    candidates = sorted(
        (p for p in directory.glob("*.ckpt") if p != exclude and p.is_file()),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    for candidate in candidates:
        try:
            load_checkpoint(candidate)
        except UnreadableCheckpointError as err:
            log.warning("%s", err)
            continue
        return candidate
    return None


class RunCheckpointState(L.Callback):
    """Keeps a run's checkpoints and its loggers' history in step: stores ``config``
    (:func:`~genie_dg.run_dir.config.keyed_config`) in every checkpoint and flushes the loggers
    before it is written (their history is never shorter than the checkpoint's); a resumed run's
    loggers forget what they logged past its checkpoint (it is logged again), and log the test
    at the step of the trained model."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            drop_rows_after = getattr(logger, "drop_rows_after", None)
            if drop_rows_after is not None:
                drop_rows_after(trainer.global_step)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            start_test = getattr(logger, "start_test", None)
            if start_test is not None:
                start_test(trainer.global_step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_CONFIG_KEY] = self.config
        for logger in trainer.loggers:
            logger.save()


def check_start_checkpoint(path: Path, cfg: DictConfig, weights_only: bool) -> dict[str, Any]:
    """Load the checkpoint a run starts from and refuse it when the run that wrote it had
    another configuration, unless only its weights are taken (``weights_only``)."""
    checkpoint = load_checkpoint(path, "ckpt_path")
    saved = checkpoint.get(CHECKPOINT_CONFIG_KEY)
    if weights_only:
        return checkpoint
    if saved is None:
        log.warning("ckpt_path=%s records no configuration (an older genie-dg wrote it): not compared", path)
        return checkpoint
    difference = config_difference(saved, keyed_config(cfg), "in the checkpoint")
    if difference is not None:
        raise UserInputError(
            f"ckpt_path={path} was written by a run of another configuration ({difference}); "
            "repeat its settings to resume it, or add +ckpt_weights_only=true to start this run "
            "from its weights only"
        )
    return checkpoint


class CheckpointOnSigterm(L.Callback):
    """Save ``path`` when Lightning stops a fit on SIGTERM (what SLURM sends before a kill).

    Lightning's own handler only flags the signal and raises :class:`SIGTERMException` at the
    next step boundary; this writes the state after that finished step, so the rerun resumes
    there. Stopped inside a validation it saves nothing: that checkpoint would resume past the
    unfinished validation and lose its record, so the previous validation's checkpoint stands.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.training:
            trainer.save_checkpoint(self.path)
            log.info("SIGTERM: saved step %d to %s", trainer.global_step, self.path)
