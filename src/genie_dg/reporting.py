"""What a run reports: its loggers (resumable CSV, W&B), its summary, the printed table.

A resumed run's history stays whole in every logger: :class:`ResumableCSVLogger` appends to the
run's ``metrics.csv`` (Lightning's deletes it) after dropping the rows past the checkpoint, and
the W&B run keeps one id per run directory (:func:`genie_dg.run_dir.wandb_run_id`), so a
resumption logs into the same W&B run. ``WANDB_MODE=online`` without a reachable server logs
offline instead, saying so, rather than waiting minutes for a traceback.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import lightning as L
import wandb
from hydra.utils import get_class, instantiate
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from genie_dg.data import MultiDomainDataModule
from genie_dg.results.records import RunIdentity
from genie_dg.run_dir import read_summary, wandb_run_id, write_atomically
from genie_dg.sweep import sweep_group

log = logging.getLogger(__name__)
# Seconds to wait for the W&B server before logging offline.
WANDB_CONNECT_SECONDS = 5.0
ROLE_LABELS = {
    "source": "source (held-out val)",
    "target": "target (unseen)",
    "target_validation": "target (held-out, oracle val)",
}


# ----------------------------------------------------------------------------- loggers


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping an existing ``metrics.csv`` and its columns."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def drop_rows_after(self, step: int) -> None:
        """Forget the rows logged past ``step`` (a run resumed there logs them again) and a last
        row a kill cut short."""
        self.save()
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            text = file.read()
        whole = text[: text.rfind("\n") + 1]
        rows = list(csv.DictReader(io.StringIO(whole, newline="")))
        # The test at the end is run again too: its row goes, wherever the run stopped.
        kept = [row for row in rows if _step(row) is not None and _step(row) <= step and not _is_test_row(row)]
        if whole != text or len(kept) != len(rows):
            write_atomically(Path(self.metrics_file_path), _rows_text(self.metrics_keys, kept))


def _is_test_row(row: dict[str, str]) -> bool:
    return any(key.startswith("test/") and value for key, value in row.items())


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


def _rows_text(fieldnames: list[str], rows: list[dict[str, str]]) -> str:
    """Rows as Lightning's writer writes them (csv's default line ends)."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSV logger appending to the run's ``metrics.csv`` instead of deleting it.

    The test's row carries the step of the trained model and no epoch: Lightning's counters
    there depend on whether the fit trained its last steps or resumed after them."""

    test_step: int | None = None

    def start_test(self, step: int) -> None:
        """Log the test at ``step``, and forget the test row of an earlier start (cut short
        after its test: the test is run again)."""
        self.test_step = step
        self.drop_rows_after(step)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.test_step is not None and any(key.startswith("test/") for key in metrics):
            metrics = {key: value for key, value in metrics.items() if key != "epoch"}
            step = self.test_step
        super().log_metrics(metrics, step)

    @property
    @rank_zero_only
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def drop_rows_after(self, step: int) -> None:
        if rank_zero_only.rank == 0:
            self.experiment.drop_rows_after(step)


def wandb_reachable(url: str) -> str | None:
    """None if a TCP connection to ``url``'s server (or to the HTTPS proxy) opens, else why not."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urllib.parse.urlparse(proxy or url)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname or "", port), timeout=WANDB_CONNECT_SECONDS):
            return None
    except OSError as err:
        return f"{target.hostname}:{port}: {err.strerror or err}"


def instantiate_logger(node: DictConfig, identity: RunIdentity, output_dir: Path) -> Any:
    """A logger from its config. A W&B run keeps one id per run directory; without a configured
    name or group it is named after the run and grouped by its sweep, and logs no checkpoint
    itself (:func:`report_to_wandb` logs the selected one when the config asks for ``log_model``)."""
    if not issubclass(get_class(node._target_), WandbLogger):
        return instantiate(node)
    overrides: dict[str, Any] = {}
    if node.get("mode") == "online":
        base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        problem = wandb_reachable(base_url)
        if problem is not None:
            log.warning(
                "W&B: cannot reach %s (%s): logging offline instead; upload later with `wandb sync %s`",
                base_url,
                problem,
                output_dir / "wandb",
            )
            overrides["mode"] = "offline"
            # wandb reads the environment too: it must agree with the logger's mode.
            os.environ["WANDB_MODE"] = "offline"
    return instantiate(
        node,
        name=node.get("name") or identity.name,
        group=node.get("group") or sweep_group(),
        log_model=False,
        id=wandb_run_id(output_dir),
        **overrides,
    )


def wandb_logs_model(cfg: DictConfig) -> bool:
    loggers = (cfg.get("logger") or {}).values()
    return any(c is not None and issubclass(get_class(c._target_), WandbLogger) and c.get("log_model") for c in loggers)


def report_to_wandb(logger: WandbLogger, summary: dict[str, Any], wants_model: bool) -> None:
    """The run's summary accuracies and, if ``wants_model``, its selected checkpoint as an artifact."""
    run = logger.experiment
    run.summary.update({"source_acc": summary["source_acc"], "target_acc": summary["target_acc"]})
    checkpoint = summary["files"].get("checkpoint")
    if wants_model and checkpoint:
        artifact = wandb.Artifact(
            f"model-{run.id}",
            type="model",
            metadata={
                "selection": "training-domain validation",
                "source_acc": summary["source_acc"],
                "target_acc": summary["target_acc"],
            },
        )
        # The checkpoint is final: referencing it spares a copy into W&B's staging area.
        artifact.add_file(checkpoint, name=Path(checkpoint).name, policy="immutable")
        run.log_artifact(artifact, aliases=["selected"])


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, its training total counted over the whole run.

    Training is one endless epoch ended by ``max_steps``; Lightning sizes the bar by the steps
    *left* while it counts the batch index from the epoch's start, so a run resumed at step 200
    of 300 read ``200/99``. The total here is the run's whole length in batches."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.num_training_batches == float("inf") and trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps * trainer.accumulate_grad_batches
        return super().total_train_batches


# ----------------------------------------------------------------------------- summary


def backbone_record(model: Any) -> dict[str, Any]:
    """The weights a run's network started from (``weights_record`` of
    :func:`genie_dg.models.create_backbone`) and its BatchNorm mode, for its records and summary."""
    featurizer = model.network.featurizer
    weights = getattr(featurizer, "weights_record", None)
    described = weights.as_dict() if weights is not None else {"source": "random", "model": type(featurizer).__name__}
    return {"weights": described, "freeze_bn": bool(model.network.freeze_bn)}


def summarize(
    identity: RunIdentity,
    datamodule: MultiDomainDataModule,
    metrics: dict[str, float],
    checkpoint: str,
    output_dir: Path,
    trainer: L.Trainer,
) -> dict[str, Any]:
    """The run's ``summary.json``: what it is (``run``: the :class:`RunIdentity` its records
    carry), its steps, its tested accuracies, where its files are."""
    domains = [
        {
            "domain": s.name,
            "role": s.role,
            "accuracy": metrics.get(s.metric_key("test")),
        }
        for s in datamodule.eval_sets
    ]
    files = {"run_dir": str(output_dir), "config": str(output_dir / "config_resolved.yaml")}
    if checkpoint:
        files["checkpoint"] = checkpoint
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            files["csv_metrics"] = str(Path(logger.log_dir) / "metrics.csv")
        elif isinstance(logger, WandbLogger):
            files["wandb"] = str(Path(logger.save_dir or output_dir) / "wandb")
    return {
        "run": identity.as_dict(),
        "steps": trainer.global_step,
        "source_acc": metrics.get("test/source_acc"),
        "target_acc": metrics.get("test/target_acc"),
        "domains": domains,
        "files": files,
    }


def summary_run(summary: dict[str, Any]) -> dict[str, Any]:
    """What the run of a ``summary.json`` is: its ``run``, or, in a summary written before the
    identity was embedded, the same keys at the top level."""
    return summary.get("run") or summary


def finished_summary(output_dir: Path) -> dict[str, Any]:
    """The saved summary of the finished run in ``output_dir``, printed as at its end."""
    log.info("%s finished before: skipping it", output_dir)
    summary = read_summary(output_dir)
    print_summary(summary)
    return summary


@rank_zero_only
def print_summary(summary: dict[str, Any]) -> None:
    """The run's accuracy table and where its files are (relative to the working directory when
    under it), printed once per run: by rank 0 of a DDP run."""
    console = Console()
    run = summary_run(summary)
    table = Table(
        title=(
            f"{run['dataset']} | {run['algorithm']} + {run['optimizer']} | "
            f"{summary['steps']} steps | seed {run['seed']}"
        )
    )
    table.add_column("domain")
    table.add_column("role")
    table.add_column("accuracy (%)", justify="right")

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    for row in summary["domains"]:
        table.add_row(row["domain"], ROLE_LABELS[row["role"]], pct(row["accuracy"]))
    table.add_section()
    table.add_row("mean", "source (held-out val)", pct(summary["source_acc"]))
    table.add_row("mean", "target (unseen)", pct(summary["target_acc"]))
    console.print(table)
    for name, path in summary["files"].items():
        console.print(f"{name:>12}: {_shown_path(path)}", highlight=False, soft_wrap=True)


def _shown_path(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path
