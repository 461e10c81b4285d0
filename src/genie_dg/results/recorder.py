"""The Lightning callback that writes a run's ``results.jsonl`` (format: :mod:`genie_dg.results.records`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from genie_dg.data import EvalSet
from genie_dg.results.records import RunIdentity, read_run, record_line
from genie_dg.run_dir import write_atomically


class ResultsRecorder(Callback):
    """Appends a record to ``path`` after every validation, from the global-rank-0 process only,
    independently of any logger."""

    def __init__(self, path: Path, identity: RunIdentity, eval_sets: Sequence[EvalSet]) -> None:
        self.path = Path(path)
        self.identity = identity
        self.eval_sets = list(eval_sets)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from a checkpoint validates again the steps after it: drop their records,
        # and a last line a kill cut short. Rewritten whole or not at all.
        if trainer.is_global_zero and self.path.exists():
            kept = [r for r in read_run(self.path, "") if r.step <= trainer.global_step]
            write_atomically(self.path, "".join(record_line(self.identity, r.step, r.accuracy) + "\n" for r in kept))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        accuracy = split_accuracies(self.eval_sets, trainer.callback_metrics, "val")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write(record_line(self.identity, trainer.global_step, accuracy) + "\n")
            # On disk before the checkpoint of this validation is written.
            file.flush()
            os.fsync(file.fileno())


def split_accuracies(eval_sets: Iterable[EvalSet], metrics: dict[str, Any], stage: str) -> dict[str, dict[str, float]]:
    """``{domain: {"in"|"out": accuracy}}`` from the ``<stage>/<eval set>/acc`` metrics."""
    accuracy: dict[str, dict[str, float]] = {}
    for eval_set in eval_sets:
        value = metrics.get(eval_set.metric_key(stage))
        if value is None:
            continue
        accuracy.setdefault(eval_set.domain, {})[eval_set.split] = float(value)
    return accuracy
