"""A run from its composed Hydra config: claim its directory, build, train, test and report.

:func:`train` reads top to bottom: the run directory decides what to do (a finished run is
reported, a run another process trains is left to it, an interrupted one resumes:
:mod:`genie_dg.run_dir`), then :func:`train_in` builds the data module, model, callbacks,
loggers and trainer (:func:`build`), fits, tests the checkpoint selected by training-domain
validation and reports it (:mod:`genie_dg.reporting`).
"""

from __future__ import annotations

import copy
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_optimizer.base.exception import NegativeLRError, NegativeStepError

from genie_dg.data import MultiDomainDataModule
from genie_dg.errors import UserInputError
from genie_dg.module import DGModule
from genie_dg.reporting import (
    backbone_record,
    finished_summary,
    instantiate_logger,
    print_summary,
    report_to_wandb,
    summarize,
    wandb_logs_model,
)
from genie_dg.results.recorder import ResultsRecorder
from genie_dg.results.records import RESULTS_FILE, RunIdentity
from genie_dg.run_dir import (
    CHECKPOINT_CONFIG_KEY,
    AtomicCheckpointIO,
    ResumePoint,
    RunCheckpointState,
    check_start_checkpoint,
    config_difference,
    is_done,
    keyed_config,
    mark_done,
    prepare_output_dir,
    refuse_other_config,
    resume_point,
    run_lock,
    write_atomically,
)
from genie_dg.sweep import sample_hparams, searched_hparams

log = logging.getLogger(__name__)
# Lightning's DDP strategies and their variants that look for parameters a step left unused.
FINDS_UNUSED_PARAMETERS = {
    name: f"{name}_find_unused_parameters_true" for name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
}


def train(cfg: DictConfig) -> dict[str, Any] | None:
    """Train, select the checkpoint by training-domain validation, test it, report and save.

    A run directory that holds another configuration's run is refused; one that holds the
    :data:`~genie_dg.run_dir.DONE_MARKER` is not run again (its summary is returned); one that
    holds a checkpoint but no marker resumes from it (:func:`~genie_dg.run_dir.resume_point`);
    one that another process is training (:func:`~genie_dg.run_dir.run_lock`) is left to it
    (None). Searched hyper-parameters are first replaced by their draws for ``hparams_seed``.
    """
    check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    prepare_output_dir(output_dir)
    refuse_other_config(output_dir, cfg)
    if is_done(output_dir):
        return finished_summary(output_dir)
    with ExitStack() as locks:
        holder = locks.enter_context(run_lock(output_dir))
        if holder is None:
            start = resume_point(cfg, output_dir)
            if start.output_dir != output_dir:
                output_dir = start.output_dir
                holder = locks.enter_context(run_lock(output_dir))
        if holder is not None:
            log.warning("%s is being trained by another process (pid %s): leaving it to that one", output_dir, holder)
            return None
        # Checked again under the lock: another process may have finished it since the first look.
        if is_done(output_dir):
            return finished_summary(output_dir)
        return train_in(cfg, start)


def train_in(cfg: DictConfig, start: ResumePoint) -> dict[str, Any]:
    """Train the run ``start`` names in its directory, from its checkpoint if it has one."""
    output_dir = start.output_dir
    sample_hparams(cfg)
    weights_only = bool(cfg.get("ckpt_weights_only", False))
    start_checkpoint = check_start_checkpoint(Path(start.ckpt_path), cfg, weights_only) if start.start_file else None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    write_atomically(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(resolved))
    datamodule, model, trainer, identity = build(cfg)
    ckpt_path = start.ckpt_path
    if start_checkpoint is not None and weights_only:
        start_from_weights(model, start_checkpoint, ckpt_path, cfg)
        ckpt_path = None
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)
    try:
        # weights_only: loading a checkpoint must never run code pickled into it.
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        summary = summarize(identity, datamodule, tested[0] if tested else {}, best, output_dir, trainer)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                report_to_wandb(logger, summary, wants_model=wandb_logs_model(cfg))
    finally:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()
    mark_done(output_dir, summary)
    print_summary(summary)
    return summary


def start_from_weights(model: DGModule, checkpoint: dict[str, Any], path: str, cfg: DictConfig) -> None:
    """Start ``model`` from a checkpoint's weights only (``+ckpt_weights_only=true``): its
    optimizer state, step and callbacks' state are left behind."""
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        saved = checkpoint.get(CHECKPOINT_CONFIG_KEY)
        difference = config_difference(saved, keyed_config(cfg), "in the checkpoint") if saved else None
        reason = difference or str(err).splitlines()[0]
        raise UserInputError(
            f"ckpt_path={path}: its weights do not fit this model ({reason}); start from a "
            "checkpoint of the same backbone, algorithm and dataset"
        ) from None
    log.info("ckpt_weights_only: starting from the weights of %s (step %s)", path, checkpoint.get("global_step"))


# numpy's seeds, which Lightning's seed_everything passes on: [0, 2**32).
SEED_RANGE = (0, 2**32 - 1)


def check_config(cfg: DictConfig) -> None:
    """Reject impossible settings before any data is loaded or model built."""
    for key in ("trial_seed", "seed", "hparams_seed"):
        value = cfg.get(key)
        if key in cfg and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= SEED_RANGE[1]):
            raise UserInputError(f"{key}={value!r}: a seed is a whole number from 0 to {SEED_RANGE[1]}, e.g. {key}=0")
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


def checked_optimizer(node: DictConfig) -> Any:
    """The optimizer factory of ``node``, tried once on a stand-in parameter: a value its
    constructor rejects (``optimizer.lr=-1``) is one ``error:`` line now, not a traceback from
    inside the fit."""
    factory = instantiate_or_explain(node)
    try:
        factory([torch.nn.Parameter(torch.zeros(2, 2))])
    except UserInputError:
        raise
    except (ValueError, TypeError, NegativeLRError, NegativeStepError) as err:
        name = str(node.get("_target_", "optimizer")).rsplit(".", 1)[-1]
        raise UserInputError(
            f"optimizer {name} refuses its arguments ({err}); fix the optimizer.<name> override"
        ) from None
    return factory


def build(cfg: DictConfig) -> tuple[MultiDomainDataModule, DGModule, L.Trainer, RunIdentity]:
    """Instantiate the data module, the LightningModule and the Trainer of a run, and build the
    run's identity once: its records and its summary carry it."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule: MultiDomainDataModule = instantiate_or_explain(cfg.dataset)
    datamodule.setup()
    data = datamodule.dataset
    featurizer = instantiate_or_explain(cfg.backbone, in_chans=data.input_shape[0])
    model = DGModule(
        featurizer=featurizer,
        algorithm=instantiate_or_explain(cfg.algorithm),
        optimizer=checked_optimizer(cfg.optimizer),
        num_classes=data.num_classes,
        train_domains=list(datamodule.train_domain_names),
        eval_roles={s.name: s.role for s in datamodule.eval_sets},
        input_shape=data.input_shape,
        freeze_bn=bool(cfg.backbone.get("freeze_bn", False)),
    )
    identity = run_identity(cfg, datamodule, model)
    callbacks = [instantiate_or_explain(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(ResultsRecorder(Path(cfg.paths.output_dir) / RESULTS_FILE, identity, datamodule.eval_sets))
    callbacks.append(RunCheckpointState(keyed_config(cfg)))
    loggers = [
        instantiate_logger(c, identity, Path(cfg.paths.output_dir))
        for c in (cfg.get("logger") or {}).values()
        if c is not None
    ]
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
    # Every checkpoint (Lightning's, the SIGTERM one) is written whole or not at all.
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()], **overrides
    )
    return datamodule, model, trainer, identity


def run_identity(cfg: DictConfig, datamodule: MultiDomainDataModule, model: DGModule) -> RunIdentity:
    """What the run is, for its records, its summary and its W&B name (see :class:`RunIdentity`)."""
    return RunIdentity(
        dataset=datamodule.dataset.name,
        protocol=datamodule.protocol,
        algorithm=type(model.algorithm).__name__,
        optimizer=str(cfg.optimizer._target_).rsplit(".", 1)[-1],
        domains=tuple(datamodule.dataset.domain_names),
        train_domains=datamodule.train_domain_names,
        test_domains=datamodule.test_domain_names,
        trial_seed=int(cfg.get("trial_seed", cfg.seed)),
        hparams_seed=int(cfg.get("hparams_seed", 0)),
        seed=int(cfg.seed),
        hparams=searched_hparams(cfg),
        backbone=backbone_record(model),
    )
