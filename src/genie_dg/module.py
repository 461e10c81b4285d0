"""The LightningModule: a timm classifier trained by a pluggable DG algorithm."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from lightning import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from genie_dg.algorithms.base import DGAlgorithm, DomainBatch
from genie_dg.models.backbone import Classifier


class DGModule(LightningModule):
    """Trains ``Classifier(featurizer)`` with ``algorithm``'s loss and ``optimizer``.

    ``algorithm`` and ``optimizer`` are factories (Hydra ``_partial_``) that this module
    completes: the algorithm with the class/domain/feature counts and input shape, the
    optimizer(s) through ``algorithm.configure_optimizers`` (by default one optimizer over the
    network and the algorithm's own submodules).

    Evaluation loaders come in ``eval_domains`` order; ``target_domains`` marks the unseen
    ones. Logged per stage (``val`` during training, ``test`` at the end): ``<stage>/<domain>/acc``,
    ``<stage>/source_acc`` (mean over the training domains' held-out slices: DomainBed's
    training-domain validation, the model-selection metric) and ``<stage>/target_acc``.
    """

    def __init__(
        self,
        featurizer: nn.Module,
        algorithm: Callable[..., DGAlgorithm],
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        num_classes: int,
        train_domains: Sequence[str],
        eval_domains: Sequence[str],
        target_domains: Sequence[str],
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        # Objects in hyper_parameters would break checkpoint loading with weights_only=True.
        self.save_hyperparameters(ignore=["featurizer", "algorithm", "optimizer"])
        self.network = Classifier(featurizer, num_classes)
        self.algorithm = algorithm(
            num_classes=num_classes,
            num_domains=len(train_domains),
            num_features=self.network.num_features,
            input_shape=input_shape,
        )
        self.algorithm.setup_network(self.network)
        # Methods with several optimizers or inner updates drive the step themselves.
        self.automatic_optimization = self.algorithm.automatic_optimization
        self.optimizer_factory = optimizer
        self.eval_domains = list(eval_domains)
        self.is_target = [d in set(target_domains) for d in eval_domains]
        self.eval_accuracy = nn.ModuleList(
            MulticlassAccuracy(num_classes=num_classes, average="micro") for _ in eval_domains
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, domain = batch
        per_domain = len(x) // len(self.hparams.train_domains)
        batches = [
            DomainBatch(xs, ys, int(ds[0]))
            for xs, ys, ds in zip(x.split(per_domain), y.split(per_domain), domain.split(per_domain))
        ]
        if self.automatic_optimization:
            output = self.algorithm.training_loss(self.network, batches)
            if output.reset_optimizer:
                self._reset_optimizer_state()
        else:
            output = self.algorithm.manual_step(self, batches)
        if not torch.isfinite(output.loss):
            raise FloatingPointError(
                f"training loss is {output.loss.item()} at step {self.global_step}; the run diverged: "
                "lower optimizer.lr (checkpoints written so far are kept)"
            )
        self.log("train/loss", output.loss, prog_bar=True)
        for name, value in output.metrics.items():
            self.log(f"train/{name}", value)
        return output.loss if self.automatic_optimization else None

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.algorithm.update_count += 1

    def _reset_optimizer_state(self) -> None:
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()

    def _eval_step(self, batch: tuple[torch.Tensor, ...], dataloader_idx: int) -> None:
        x, y, _ = batch
        self.eval_accuracy[dataloader_idx].update(self.algorithm.predict(self.network, x), y)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def _log_accuracies(self, stage: str) -> None:
        source, target = [], []
        for domain, is_target, metric in zip(self.eval_domains, self.is_target, self.eval_accuracy):
            if not metric.update_called:
                continue
            accuracy = metric.compute()
            metric.reset()
            self.log(f"{stage}/{domain}/acc", accuracy)
            (target if is_target else source).append(accuracy)
        if source:
            self.log(f"{stage}/source_acc", torch.stack(source).mean(), prog_bar=True)
        if target:
            self.log(f"{stage}/target_acc", torch.stack(target).mean())

    def on_validation_epoch_end(self) -> None:
        self._log_accuracies("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracies("test")

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        return self.algorithm.configure_optimizers(self.network, self.optimizer_factory)
