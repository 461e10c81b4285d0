"""Build everything a run needs from the composed Hydra config, train, test and report."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
import wandb
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import get_class, instantiate, to_absolute_path
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from genie_dg.data import MultiDomainDataModule
from genie_dg.errors import UserInputError
from genie_dg.module import DGModule
from genie_dg.results.recorder import ResultsRecorder
from genie_dg.results.records import RESULTS_FILE, RunIdentity
from genie_dg.sweep import (
    DONE_MARKER,
    LAST_CHECKPOINT,
    RESUME_KEY_FILE,
    latest_run,
    run_key,
    run_lock,
    sample_hparams,
    searched_hparams,
    sweep_group,
)

log = logging.getLogger(__name__)
# Lightning's DDP strategies and their variants that look for parameters a step left unused.
FINDS_UNUSED_PARAMETERS = {
    name: f"{name}_find_unused_parameters_true" for name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
}


def check_config(cfg: DictConfig) -> None:
    """Reject impossible settings before any data is loaded or model built."""
    steps = cfg.trainer.get("max_steps", -1)
    if steps is None or steps < 1:
        raise UserInputError(f"trainer.max_steps={steps}: training is step-based, set it to 1 or more")
    interval = cfg.trainer.get("val_check_interval")
    if isinstance(interval, int) and not cfg.trainer.get("fast_dev_run") and not 1 <= interval <= steps:
        raise UserInputError(
            f"trainer.val_check_interval={interval} must lie in [1, trainer.max_steps={steps}], "
            "or no validation (and no model selection) would happen"
        )


# Config keys that are read by the pipeline, not passed to the object a node builds: a group's
# hyper-parameter search distributions (read by sweeps), and the backbone's BatchNorm mode (the
# Classifier around the featurizer applies it).
NOT_ARGUMENTS = ("search", "freeze_bn")


def instantiate_or_explain(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a user mistake as itself rather than wrapped.

    Top-level :data:`NOT_ARGUMENTS` keys are left out.
    """
    if isinstance(node, DictConfig) and any(key in node for key in NOT_ARGUMENTS):
        # A deep copy keeps the parent, so interpolations such as ${seed} still resolve.
        node = copy.deepcopy(node)
        with open_dict(node):
            for key in NOT_ARGUMENTS:
                node.pop(key, None)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserInputError):
            raise err.__cause__ from None
        raise


def build(cfg: DictConfig) -> tuple[MultiDomainDataModule, DGModule, L.Trainer]:
    """Instantiate the data module, the LightningModule and the Trainer of a run."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule: MultiDomainDataModule = instantiate_or_explain(cfg.dataset)
    datamodule.setup()
    data = datamodule.dataset
    featurizer = instantiate_or_explain(cfg.backbone, in_chans=data.input_shape[0])
    model = DGModule(
        featurizer=featurizer,
        algorithm=instantiate_or_explain(cfg.algorithm),
        optimizer=instantiate_or_explain(cfg.optimizer),
        num_classes=data.num_classes,
        train_domains=[data.domain_names[d] for d in datamodule.train_domains],
        eval_domains=[s.name for s in datamodule.eval_sets],
        target_domains=[data.domain_names[d] for d in datamodule.test_domains],
        input_shape=data.input_shape,
        target_validation=[s.name for s in datamodule.eval_sets if s.is_target_validation],
        freeze_bn=bool(cfg.backbone.get("freeze_bn", False)),
    )
    identity = run_identity(cfg, datamodule, model)
    callbacks = [instantiate_or_explain(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(ResultsRecorder(Path(cfg.paths.output_dir) / RESULTS_FILE, identity, datamodule.eval_sets))
    loggers = [instantiate_logger(c, identity) for c in (cfg.get("logger") or {}).values() if c is not None]
    strategy = cfg.trainer.get("strategy")
    overrides = {}
    if model.algorithm.leaves_parameters_unused and strategy in FINDS_UNUSED_PARAMETERS:
        overrides["strategy"] = FINDS_UNUSED_PARAMETERS[strategy]
        log.info(
            "%s leaves parameters without gradient on some steps: trainer.strategy=%s instead of %s",
            type(model.algorithm).__name__,
            overrides["strategy"],
            strategy,
        )
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)
    return datamodule, model, trainer


def run_identity(cfg: DictConfig, datamodule: MultiDomainDataModule, model: DGModule) -> RunIdentity:
    """What the run is, for its records and its W&B name (see :class:`RunIdentity`)."""
    names = datamodule.dataset.domain_names
    return RunIdentity(
        dataset=datamodule.dataset.name,
        protocol=datamodule.protocol,
        algorithm=type(model.algorithm).__name__,
        optimizer=str(cfg.optimizer._target_).rsplit(".", 1)[-1],
        domains=tuple(names),
        train_domains=tuple(names[d] for d in datamodule.train_domains),
        test_domains=tuple(names[d] for d in datamodule.test_domains),
        trial_seed=int(cfg.get("trial_seed", cfg.seed)),
        hparams_seed=int(cfg.get("hparams_seed", 0)),
        seed=int(cfg.seed),
        hparams=searched_hparams(cfg),
    )


def instantiate_logger(node: DictConfig, identity: RunIdentity) -> Any:
    """A logger from its config. A W&B run without a configured name or group is named after the
    run and grouped by its sweep, and logs no checkpoint itself: :func:`train` logs the selected
    one when the config asks for ``log_model``."""
    if not issubclass(get_class(node._target_), WandbLogger):
        return instantiate(node)
    return instantiate(
        node, name=node.get("name") or identity.name, group=node.get("group") or sweep_group(), log_model=False
    )


def train(cfg: DictConfig) -> dict[str, Any] | None:
    """Train, select the checkpoint by training-domain validation, test it, report and save.

    A run directory that holds the :data:`~genie_dg.sweep.DONE_MARKER` is not run again (its
    summary is returned); one that holds a last checkpoint but no marker resumes from it; one
    that another process is training (:func:`~genie_dg.sweep.run_lock`) is left to it (None).
    Searched hyper-parameters are first replaced by their draws for ``hparams_seed``.
    """
    output_dir = Path(cfg.paths.output_dir)
    if (output_dir / DONE_MARKER).is_file():
        return finished_summary(output_dir)
    prepare_output_dir(output_dir)
    with ExitStack() as locks:
        holder = locks.enter_context(run_lock(output_dir))
        if holder is None:
            resumed_dir, ckpt_path = resume_point(cfg, output_dir)
            if resumed_dir != output_dir:
                output_dir = resumed_dir
                holder = locks.enter_context(run_lock(output_dir))
        if holder is not None:
            log.warning("%s is being trained by another process (pid %s): leaving it to that one", output_dir, holder)
            return None
        # Checked again under the lock: another process may have finished it since the first look.
        if (output_dir / DONE_MARKER).is_file():
            return finished_summary(output_dir)
        return _train_in(cfg, output_dir, ckpt_path)


def _train_in(cfg: DictConfig, output_dir: Path, ckpt_path: str | None) -> dict[str, Any]:
    sample_hparams(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
    datamodule, model, trainer = build(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)
    try:
        # weights_only: loading a checkpoint must never run code pickled into it.
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UserInputError(
                f"ckpt_path={ckpt_path} holds pickled objects beyond tensors and plain containers and is "
                "refused as unsafe; pass a checkpoint written by genie-dg"
            ) from err
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
        tested = trainer.test(
            model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True
        )
        summary = summarize(cfg, datamodule, tested[0] if tested else {}, best, output_dir, trainer)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                report_to_wandb(logger, summary, wants_model=_wandb_logs_model(cfg))
    finally:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / DONE_MARKER).touch()
    print_summary(summary)
    return summary


def finished_summary(output_dir: Path) -> dict[str, Any]:
    """The saved summary of the finished run in ``output_dir``, printed as at its end."""
    log.info("%s finished before: skipping it", output_dir)
    summary = json.loads((output_dir / "summary.json").read_text())
    print_summary(summary)
    return summary


def resume_point(cfg: DictConfig, output_dir: Path) -> tuple[Path, str | None]:
    """The run directory to train in and the checkpoint to resume from.

    - this directory's own ``last.ckpt`` if an earlier start left one, whatever ``ckpt_path``
      says (a job requeued after starting from a file continues, not starts over).
    - ``ckpt_path=last``: that, or else the newest run of the same config (same
      :func:`~genie_dg.sweep.run_key`) among this directory's siblings, e.g. an earlier
      ``python train.py ...`` that Hydra gave another time-stamped directory. Training then
      continues in that directory (``paths.output_dir`` is pointed there), so its records and
      checkpoints stay in one place; this directory keeps Hydra's files and a ``continued_in``
      note. If that run finished, :func:`train` reports it and trains nothing. With no such run
      it starts from scratch.
    - any other value: that checkpoint file (relative to where the command was started), which
      must exist, when the directory has no ``last.ckpt`` yet.
    """
    key = run_key(cfg)
    (output_dir / RESUME_KEY_FILE).write_text(key)
    ckpt_path = cfg.get("ckpt_path")
    own = output_dir / LAST_CHECKPOINT
    explicit = None if ckpt_path in (None, "last") else Path(to_absolute_path(str(ckpt_path)))
    if explicit is not None and not explicit.is_file():
        raise UserInputError(
            f"ckpt_path={ckpt_path} is not a file; pass a checkpoint (e.g. <run dir>/{LAST_CHECKPOINT}) "
            "or ckpt_path=last to continue the newest run of this config"
        )
    if own.is_file():
        # Also over an explicit ckpt_path: a requeued job has moved past the file it started from.
        log.info("resuming the unfinished run from %s", own)
        return output_dir, str(own)
    if explicit is not None:
        return output_dir, str(explicit)
    if ckpt_path is None:
        return output_dir, None
    earlier = latest_run(output_dir.parent, key, exclude=output_dir)
    if earlier is None:
        log.warning("ckpt_path=last: no earlier run of this config under %s; starting from scratch", output_dir.parent)
        return output_dir, None
    prepare_output_dir(earlier)
    if not (earlier / DONE_MARKER).is_file():
        log.info("ckpt_path=last: continuing the unfinished run in %s", earlier)
        (output_dir / "continued_in").write_text(f"{earlier}\n")
    with open_dict(cfg):
        cfg.paths.output_dir = str(earlier)
    return earlier, str(earlier / LAST_CHECKPOINT)


class WritableOutputCheck(Callback):
    """Hydra callback: prove ``hydra.run.dir`` (or ``hydra.sweep.dir``) writable before Hydra
    creates it, so an unwritable place ends in one ``error:`` line (exit status 2), not in a
    traceback from inside Hydra."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(directory: str, key: str) -> None:
        try:
            prepare_output_dir(Path(directory))
        except UserInputError as err:
            print(f"error: {err} ({key})", file=sys.stderr)
            raise SystemExit(2) from None


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


def _wandb_logs_model(cfg: DictConfig) -> bool:
    loggers = (cfg.get("logger") or {}).values()
    return any(
        c is not None and issubclass(get_class(c._target_), WandbLogger) and c.get("log_model") for c in loggers
    )


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


def summarize(
    cfg: DictConfig,
    datamodule: MultiDomainDataModule,
    metrics: dict[str, float],
    checkpoint: str,
    output_dir: Path,
    trainer: L.Trainer,
) -> dict[str, Any]:
    domains = [
        {
            "domain": s.name,
            "role": "target_validation" if s.is_target_validation else "target" if s.is_target else "source",
            "accuracy": metrics.get(f"test/{s.name}/acc"),
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
        "dataset": datamodule.dataset.name,
        "protocol": datamodule.protocol,
        "algorithm": type(trainer.lightning_module.algorithm).__name__,
        "optimizer": type(trainer.optimizers[0]).__name__ if trainer.optimizers else None,
        "steps": trainer.global_step,
        "seed": cfg.seed,
        "trial_seed": cfg.get("trial_seed", cfg.seed),
        "hparams_seed": cfg.get("hparams_seed", 0),
        "hparams": searched_hparams(cfg),
        "source_acc": metrics.get("test/source_acc"),
        "target_acc": metrics.get("test/target_acc"),
        "domains": domains,
        "files": files,
    }


ROLE_LABELS = {
    "source": "source (held-out val)",
    "target": "target (unseen)",
    "target_validation": "target (held-out, oracle val)",
}


@rank_zero_only
def print_summary(summary: dict[str, Any]) -> None:
    """The run's accuracy table and where its files are (relative to the working directory when
    under it), printed once per run: by rank 0 of a DDP run."""
    console = Console()
    table = Table(
        title=(
            f"{summary['dataset']} | {summary['algorithm']} + {summary['optimizer']} | "
            f"{summary['steps']} steps | seed {summary['seed']}"
        )
    )
    table.add_column("domain")
    table.add_column("role")
    table.add_column("accuracy (%)", justify="right")

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    for row in summary["domains"]:
        role = ROLE_LABELS[row["role"]]
        table.add_row(row["domain"], role, pct(row["accuracy"]))
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
