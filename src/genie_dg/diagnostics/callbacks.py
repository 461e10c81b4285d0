"""Lightning callbacks that show what the optimizer does (``callbacks=diagnostics``).

Each works with any optimizer (the measured OSGR with those that step from ``.grad``), runs
only every ``every_n_steps`` training steps and only on the global-zero rank, logs numbers to
every logger at the training step they describe and, at the end of training, writes PNG
figures under ``output_dir`` (default ``<trainer.default_root_dir>/diagnostics``) that also go
to W&B as images. None of them changes training: a run with them ends bitwise equal to a run
without them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from genie_dg.diagnostics import balance, figures
from genie_dg.diagnostics.embedding import check_method, embed
from genie_dg.diagnostics.osgr import (
    estimated_osgr,
    gradient_statistics,
    measure_one_step_decrease,
    preconditioners,
)
from genie_dg.errors import UserInputError
from genie_dg.optim import differentiates_gradient, evaluates_closure


def _positive(value: int, name: str, owner: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise UserInputError(f"{owner}: {name}={value!r} must be an integer of at least 1")
    return value


def _output_dir(output_dir: str | None, trainer: L.Trainer) -> Path:
    return Path(output_dir) if output_dir is not None else Path(trainer.default_root_dir) / "diagnostics"


def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _optimized_parameters(trainer: L.Trainer, module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's trainable parameters that some optimizer updates, by name, in module order."""
    held = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]}
    return {name: p for name, p in module.named_parameters() if p.requires_grad and id(p) in held}


def _eval_datasets(trainer: L.Trainer, owner: str) -> list[tuple[str, bool, Dataset]]:
    """(name, is_target, unaugmented dataset) of every evaluation loader of the data module."""
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "eval_sets"):
        raise UserInputError(f"{owner} reads held-out domains from a MultiDomainDataModule; pass one to trainer.fit")
    return [
        (s.name, s.is_target, loader.dataset) for s, loader in zip(datamodule.eval_sets, datamodule.val_dataloader())
    ]


def _endless_batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[tuple[Tensor, ...]]:
    # The loader's own generator: a loader without one draws its seeds from the global
    # generator and would shift training's random draws.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


class OSGRMonitor(Callback):
    """OSGR over training, measured (paper Eq. 1) and estimated (docs/genie.md), and the GSNR.

    Every ``every_n_steps`` steps, just before the optimizer steps (gradients in place):

    * ``measured``: the optimizer's step is made, the cross-entropy decrease on a batch of the
      training domains' held-out slices and on a batch of the target domains is divided by the
      decrease on the training batch, and everything is undone
      (:func:`~genie_dg.diagnostics.osgr.measure_one_step_decrease`). Logs
      ``osgr/measured_source`` (Eq. 1: held-out data of the training distribution),
      ``osgr/measured_target`` and the three decreases. Gradient clipping, which Lightning
      applies after this hook, is not part of the measured step. Optimizers whose step
      re-evaluates the loss (SAM, GAM, FAD) or differentiates the gradient (AdaHessian) cannot
      be replayed from ``.grad``: for them only the estimate is logged (with a warning).
    * ``estimated``: gradients of the training batch's cross-entropy per unit of
      ``samples_per_unit`` samples (torch.func), their per-coordinate mean and variance, and
      the optimizer's preconditioner give ``osgr/estimated``
      (:func:`~genie_dg.diagnostics.osgr.estimated_osgr`) and ``gsnr/median``. Networks with
      BatchNorm need ``samples_per_unit >= 2``. A DG penalty is not part of either loss.

    Figures: ``osgr.png`` (the series over steps) and ``gsnr_per_layer.png`` (per-layer GSNR
    distribution at the last measurement, ``gsnr_samples_per_layer`` coordinates per layer).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        measured: bool = True,
        estimated: bool = True,
        samples_per_unit: int = 1,
        units_per_chunk: int = 8,
        gsnr_samples_per_layer: int = 1000,
        seed: int = 0,
        output_dir: str | None = None,
    ) -> None:
        owner = type(self).__name__
        self.every_n_steps = _positive(every_n_steps, "every_n_steps", owner)
        self.samples_per_unit = _positive(samples_per_unit, "samples_per_unit", owner)
        self.units_per_chunk = _positive(units_per_chunk, "units_per_chunk", owner)
        self.gsnr_samples_per_layer = _positive(gsnr_samples_per_layer, "gsnr_samples_per_layer", owner)
        if not (measured or estimated):
            raise UserInputError(f"{owner}: measured and estimated are both false; enable one or drop the callback")
        self.measured = measured
        self.estimated = estimated
        self.seed = seed
        self.output_dir = output_dir
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.gsnr_layers: dict[str, np.ndarray] = {}
        self.gsnr_step = 0
        self._batch: tuple[Tensor, Tensor] | None = None
        self._heldout: dict[str, Dataset] = {}
        self._heldout_batches: dict[str, Iterator[tuple[Tensor, ...]]] = {}
        self._warned_unreplayable = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only rank zero measures; a synchronised BatchNorm would wait for the other ranks forever.
        if trainer.world_size > 1 and any(isinstance(m, nn.SyncBatchNorm) for m in pl_module.modules()):
            raise UserInputError("OSGRMonitor runs on rank zero alone and cannot run with trainer.sync_batchnorm=true")
        if not self.measured:
            return
        sets = _eval_datasets(trainer, type(self).__name__)
        for role, is_target in (("source", False), ("target", True)):
            datasets = [dataset for _, target, dataset in sets if target is is_target]
            if datasets:
                self._heldout[role] = ConcatDataset(datasets)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        due = trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0
        # One DomainBatch per training domain: the step's whole batch, as the optimizer saw it.
        self._batch = (torch.cat([b.x for b in batch]), torch.cat([b.y for b in batch])) if due else None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        if self._batch is None:
            return
        x, y = self._batch
        # Once per training step, whatever the number of optimizers.
        self._batch = None
        metrics: dict[str, float] = {}
        if self.estimated:
            metrics.update(self._estimate(trainer, pl_module, x, y))
        if self.measured and self._replayable(optimizer):
            metrics.update(self._measure(pl_module, optimizer, x, y))
        for name, value in metrics.items():
            self.history.setdefault(name, []).append((trainer.global_step, value))
        _log(trainer, metrics, trainer.global_step)

    def _estimate(self, trainer: L.Trainer, pl_module: L.LightningModule, x: Tensor, y: Tensor) -> dict[str, float]:
        parameters = _optimized_parameters(trainer, pl_module)
        statistics = gradient_statistics(
            pl_module, parameters, x, y, samples_per_unit=self.samples_per_unit, units_per_chunk=self.units_per_chunk
        )
        ratio = estimated_osgr(statistics, preconditioners(trainer.optimizers, parameters))
        gsnr = {name: r[torch.isfinite(r)].cpu() for name, r in statistics.gsnr().items()}
        # A sample of each layer's coordinates is enough for its distribution.
        generator = torch.Generator().manual_seed(self.seed)
        self.gsnr_layers = {
            name: r[torch.randperm(r.numel(), generator=generator)[: self.gsnr_samples_per_layer]].numpy()
            for name, r in gsnr.items()
            if r.numel()
        }
        self.gsnr_step = trainer.global_step
        finite = torch.cat(list(gsnr.values()))
        median = float(finite.median()) if finite.numel() else float("nan")
        return {"osgr/estimated": ratio, "gsnr/median": median}

    def _replayable(self, optimizer: Optimizer) -> bool:
        if not (evaluates_closure(optimizer) or differentiates_gradient(optimizer)):
            return True
        if not self._warned_unreplayable:
            self._warned_unreplayable = True
            rank_zero_warn(
                f"OSGRMonitor: no measured OSGR with {type(optimizer).__name__}: its step re-evaluates the "
                "loss through a closure or differentiates the gradient, which a trial step cannot replay "
                "from .grad; the estimated OSGR is still logged"
            )
        return False

    def _measure(self, pl_module: L.LightningModule, optimizer: Optimizer, x: Tensor, y: Tensor) -> dict[str, float]:
        heldout = {}
        for role, dataset in self._heldout.items():
            if role not in self._heldout_batches:
                self._heldout_batches[role] = _endless_batches(dataset, len(x), self.seed)
            batch = next(self._heldout_batches[role])
            heldout[role] = (batch[0].to(x.device), batch[1].to(y.device))
        decrease = measure_one_step_decrease(pl_module, optimizer, (x, y), heldout)
        metrics = {"osgr/train_decrease": decrease.train}
        for role in heldout:
            metrics[f"osgr/measured_{role}"] = decrease.osgr(role)
            metrics[f"osgr/{role}_decrease"] = decrease.heldout[role]
        return metrics

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        directory = _output_dir(self.output_dir, trainer)
        series = {
            label: self.history[key]
            for key, label in (
                ("osgr/measured_source", "measured, held-out source (Eq. 1)"),
                ("osgr/measured_target", "measured, target domain"),
                ("osgr/estimated", "estimated from gradient statistics"),
            )
            if key in self.history
        }
        figures.save_figure(figures.osgr_figure(series), directory / "osgr.png", trainer.loggers, trainer.global_step)
        if self.gsnr_layers:
            figure = figures.gsnr_figure(list(self.gsnr_layers), list(self.gsnr_layers.values()), self.gsnr_step)
            figures.save_figure(figure, directory / "gsnr_per_layer.png", trainer.loggers, trainer.global_step)


class UpdateBalanceMonitor(Callback):
    """How evenly the optimizer moves the layers (paper Fig. 1), every ``every_n_steps`` steps.

    Two heat-maps over training (``update_balance.png``, layers by recorded steps):

    * ours, the update itself: the root-mean-square change of each parameter tensor in that
      step, divided by the step's largest; ``balance/update_gini`` is the Gini coefficient of
      these per-layer magnitudes (0: every layer moves alike; (n-1)/n: one layer moves alone).
    * the authors' variant (what their code plotted): the cumulative change of the raw
      gradient, ``sum_t mean|g_t - g_(t-1)|`` per layer, min-max normalised per step. The sum
      runs over the recorded steps only (gradients of step t-1 are kept only when step t is
      recorded), so it costs nothing in between.
    """

    def __init__(self, every_n_steps: int = 10, output_dir: str | None = None) -> None:
        self.every_n_steps = _positive(every_n_steps, "every_n_steps", type(self).__name__)
        self.output_dir = output_dir
        self.steps: list[int] = []
        self.update_magnitudes: list[Tensor] = []
        self.gradient_changes: list[Tensor] = []
        self._tracked: dict[str, nn.Parameter] = {}
        self._cumulative_change: Tensor | None = None
        self._previous_gradients: dict[str, Tensor] | None = None
        self._before_step: dict[str, Tensor] | None = None
        self._last_step = -1

    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tracked = _optimized_parameters(trainer, pl_module)

    def _gradients(self) -> dict[str, Tensor]:
        return {
            name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for name, p in self._tracked.items()
        }

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return
        self._last_step = step
        if self._due(step):
            self._before_step = {name: p.detach().clone() for name, p in self._tracked.items()}
            if self._cumulative_change is None:
                self._cumulative_change = torch.zeros(len(self._tracked), dtype=torch.float64)
            if self._previous_gradients is not None:
                change = balance.mean_absolute_change(self._previous_gradients, self._gradients())
                self._cumulative_change = self._cumulative_change + change
                self._previous_gradients = None
            self.gradient_changes.append(self._cumulative_change.clone())
        if self._due(step + 1):
            self._previous_gradients = self._gradients()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._before_step is None:
            return
        after = {name: p.detach() for name, p in self._tracked.items()}
        magnitudes = balance.rms_change(self._before_step, after)
        self._before_step = None
        # global_step already counts this step; the record belongs to the step that made it.
        step = trainer.global_step - 1
        self.steps.append(step)
        self.update_magnitudes.append(magnitudes)
        _log(trainer, {"balance/update_gini": balance.gini(magnitudes)}, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.steps:
            return
        updates = balance.max_normalised(torch.stack(self.update_magnitudes, dim=1))
        changes = balance.min_max_normalised(torch.stack(self.gradient_changes[: len(self.steps)], dim=1))
        figure = figures.balance_figure(self.steps, list(self._tracked), updates.numpy(), changes.numpy())
        path = _output_dir(self.output_dir, trainer) / "update_balance.png"
        figures.save_figure(figure, path, trainer.loggers, trainer.global_step)


class FeatureMap(Callback):
    """At the end of training, a 2-D map of the penultimate features (paper Fig. 3).

    Up to ``max_samples_per_domain`` seeded samples of every evaluation set, unaugmented: the
    held-out slices of the training domains and the unseen target domains. Features are
    ``pl_module.network.features(x)`` in eval mode; the map (``method``: ``tsne`` from
    scikit-learn, or ``umap`` when umap-learn is installed) is drawn twice in
    ``feature_map_<method>.png``, coloured by class and by domain. (The authors' code
    projected augmented features of one training domain.)
    """

    def __init__(
        self, method: str = "tsne", max_samples_per_domain: int = 300, seed: int = 0, output_dir: str | None = None
    ) -> None:
        check_method(method)
        self.method = method
        self.max_samples_per_domain = _positive(max_samples_per_domain, "max_samples_per_domain", type(self).__name__)
        self.seed = seed
        self.output_dir = output_dir

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(getattr(pl_module, "network", None), "features"):
            raise UserInputError(
                f"FeatureMap needs pl_module.network.features(x) (genie_dg's DGModule); {type(pl_module).__name__} has none"
            )

    @torch.no_grad()
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        generator = torch.Generator().manual_seed(self.seed)
        features, classes, domains, labels, targets = [], [], [], [], []
        was_training = pl_module.training
        pl_module.eval()
        for index, (domain, is_target, dataset) in enumerate(_eval_datasets(trainer, type(self).__name__)):
            chosen = torch.randperm(len(dataset), generator=generator)[: self.max_samples_per_domain].tolist()
            for x, y, *_ in DataLoader(Subset(dataset, chosen), batch_size=256):
                features.append(pl_module.network.features(x.to(pl_module.device)).flatten(1).float().cpu())
                classes.append(y)
                domains.append(torch.full_like(y, index))
            labels.append(f"{domain} ({'target' if is_target else 'source, held-out'})")
            targets.append(is_target)
        pl_module.train(was_training)
        points = embed(torch.cat(features).numpy(), self.method, self.seed)
        figure = figures.feature_map_figure(
            points, torch.cat(classes).numpy(), torch.cat(domains).numpy(), labels, targets, self.method
        )
        path = _output_dir(self.output_dir, trainer) / f"feature_map_{self.method}.png"
        figures.save_figure(figure, path, trainer.loggers, trainer.global_step)
