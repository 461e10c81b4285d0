"""Surviving preemption: SIGTERM (what SLURM sends before it kills a job) leaves a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class CheckpointOnSigterm(L.Callback):
    """Save ``path`` when Lightning stops a fit on SIGTERM.

    Lightning's own handler only flags the signal and raises :class:`SIGTERMException` at the
    next step boundary; this writes the state after that finished step, so the rerun resumes
    there (:func:`genie_dg.pipeline.train` resumes from the run's last checkpoint). Stopped
    inside a validation it saves nothing: that checkpoint would resume past the unfinished
    validation and lose its record, so the previous validation's checkpoint stands instead.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.training:
            trainer.save_checkpoint(self.path)
            log.info("SIGTERM: saved step %d to %s", trainer.global_step, self.path)
