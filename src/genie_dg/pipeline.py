"""Build everything a run needs from the composed Hydra config, train, test and report."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from genie_dg.data import MultiDomainDataModule
from genie_dg.errors import UserInputError
from genie_dg.module import DGModule

log = logging.getLogger(__name__)


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


def instantiate_or_explain(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a user mistake as itself rather than wrapped.

    A top-level ``search`` key (a config's hyper-parameter search distribution, read by
    sweeps) is not an argument of the object and is left out.
    """
    if isinstance(node, DictConfig) and "search" in node:
        # A deep copy keeps the parent, so interpolations such as ${seed} still resolve.
        node = copy.deepcopy(node)
        with open_dict(node):
            del node["search"]
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
        eval_domains=[s.domain for s in datamodule.eval_sets],
        target_domains=[data.domain_names[d] for d in datamodule.test_domains],
        input_shape=data.input_shape,
    )
    callbacks = [instantiate_or_explain(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, select the checkpoint by training-domain validation, test it, report and save."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
    datamodule, model, trainer = build(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    finally:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()
    summary = summarize(cfg, datamodule, tested[0] if tested else {}, best, output_dir, trainer)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


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
            "domain": s.domain,
            "role": "target" if s.is_target else "source",
            "accuracy": metrics.get(f"test/{s.domain}/acc"),
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
        "source_acc": metrics.get("test/source_acc"),
        "target_acc": metrics.get("test/target_acc"),
        "domains": domains,
        "files": files,
    }


def print_summary(summary: dict[str, Any]) -> None:
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
        role = "target (unseen)" if row["role"] == "target" else "source (held-out val)"
        table.add_row(row["domain"], role, pct(row["accuracy"]))
    table.add_section()
    table.add_row("mean", "source (held-out val)", pct(summary["source_acc"]))
    table.add_row("mean", "target (unseen)", pct(summary["target_acc"]))
    console.print(table)
    for name, path in summary["files"].items():
        console.print(f"{name:>12}: {path}", highlight=False, soft_wrap=True)
