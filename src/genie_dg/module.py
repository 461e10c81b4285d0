"""The LightningModule: a timm classifier trained by a pluggable DG algorithm.

How optimizers meet DG algorithms
--------------------------------
With automatic optimization (``DGAlgorithm.training_loss``), Lightning hands
``optimizer.step`` a closure that re-runs :meth:`DGModule.training_step` (the algorithm's full
loss, penalties included), zeroes the gradients and back-propagates. That one mechanism serves
every optimizer: first-order ones call the closure once; SAM, GAM and FAD call it at perturbed
weights as often as they need (``genie_dg.optim.evaluates_closure``), so each of their passes
sees the whole DG objective. Optimizers that differentiate the gradient again (AdaHessian, GAM:
``genie_dg.optim.differentiates_gradient``) get ``create_graph=True`` from
:meth:`DGModule.backward`, the one place every backward pass goes through, that of
``manual_backward`` included. Only the first pass of a step logs ``train/loss`` and the
algorithm's metrics, may reset the optimizer state, and updates BatchNorm running statistics:
the later passes evaluate the loss at perturbed weights. ``train/passes_per_step`` logs the
backward passes of each step (SAM 2, GAM 2, FAD 4; Hessian-vector products inside ``step`` are
not counted). An algorithm's ``training_loss`` therefore runs once per pass; state it keeps
(GroupDRO's weights, Fishr's moving averages, Mixup's draws) changes at most once per step,
guarded by ``algorithm.update_count``.

Algorithms with manual optimization step their optimizers themselves, without a closure, so
closure-based optimizers are refused for them; so is ``precision=16-mixed``, whose gradient
scaler calls ``step()`` without a closure and scales the gradient that second-order optimizers
differentiate.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from lightning import LightningModule
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.classification import MulticlassAccuracy

from genie_dg.algorithms.base import DGAlgorithm, DomainBatch, StepContext
from genie_dg.data.datamodule import accuracy_key
from genie_dg.errors import UserInputError
from genie_dg.models.backbone import Classifier
from genie_dg.optim import differentiates_gradient, evaluates_closure


class DGModule(LightningModule):
    """Trains ``Classifier(featurizer)`` with ``algorithm``'s loss and ``optimizer``.

    ``algorithm`` and ``optimizer`` are factories (Hydra ``_partial_``) that this module
    completes: the algorithm with the class/domain/feature counts and input shape, the
    optimizer(s) through ``algorithm.configure_optimizers`` (by default one optimizer over the
    network and the algorithm's own submodules).

    ``eval_roles`` maps each evaluation loader's name, in loader order, to its role
    (:attr:`genie_dg.data.EvalSet.role`). Logged per stage (``val`` during training, ``test`` at
    the end): ``<stage>/<name>/acc``, ``<stage>/source_acc`` (mean over the ``source`` loaders,
    the training domains' held-out slices: DomainBed's training-domain validation, the
    model-selection metric) and ``<stage>/target_acc`` (mean over the ``target`` loaders). A
    ``target_validation`` loader (a target's held-out part, for oracle selection) is logged, but
    in neither mean.
    ``freeze_bn``: the featurizer's BatchNorm layers stay in eval mode (:class:`Classifier`).
    """

    def __init__(
        self,
        featurizer: nn.Module,
        algorithm: Callable[..., DGAlgorithm],
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        num_classes: int,
        train_domains: Sequence[str],
        eval_roles: Mapping[str, str],
        input_shape: Sequence[int] | None = None,
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        # Objects in hyper_parameters would break checkpoint loading with weights_only=True.
        self.save_hyperparameters(ignore=["featurizer", "algorithm", "optimizer"])
        self.network = Classifier(featurizer, num_classes, freeze_bn=freeze_bn)
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
        self.eval_roles = dict(eval_roles)
        self.eval_accuracy = nn.ModuleList(
            MulticlassAccuracy(num_classes=num_classes, average="micro") for _ in self.eval_roles
        )
        self._backward_passes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batches: list[DomainBatch], batch_idx: int) -> torch.Tensor:
        # A closure optimizer re-runs this method after each backward pass of the step.
        first_pass = self._backward_passes == 0
        if self.automatic_optimization:
            with nullcontext() if first_pass else _running_stats_frozen(self):
                output = self.algorithm.training_loss(self.network, batches)
            if output.reset_optimizer and first_pass:
                self._reset_optimizer_state()
        else:
            optimizers = self.optimizers()
            step = StepContext(
                self.network, optimizers if isinstance(optimizers, list) else [optimizers], self.manual_backward
            )
            output = self.algorithm.manual_step(step, batches)
            self._share_rank_zero_buffers()
        if not torch.isfinite(output.loss):
            raise FloatingPointError(
                f"training loss is {output.loss.item()} at step {self.global_step}; the run diverged: "
                "lower optimizer.lr (checkpoints written so far are kept)"
            )
        if first_pass:
            self.log("train/loss", output.loss, prog_bar=True)
            for name, value in output.metrics.items():
                self.log(f"train/{name}", value)
        return output.loss if self.automatic_optimization else None

    def _share_rank_zero_buffers(self) -> None:
        """Broadcast rank 0's buffers (BatchNorm running statistics...) to every replica.

        DDP does this before each forward (``broadcast_buffers``), but Lightning's manual
        optimization switches that off: without this, each replica's running statistics would
        follow its own shard, and the replicas would validate and test different models."""
        ddp = self.trainer.strategy.model
        if not (isinstance(ddp, DistributedDataParallel) and ddp.broadcast_buffers):
            return
        # One broadcast per dtype and device, not one per buffer (timm's resnet50 has 159).
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for buffer in self.buffers():
            groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
        for buffers in groups.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            torch.distributed.broadcast(flat, src=0)
            for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
                buffer.copy_(value.view_as(buffer))

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self._backward_passes += 1
        if not any(differentiates_gradient(optimizer) for optimizer in self.trainer.optimizers):
            super().backward(loss, *args, **kwargs)
            return
        with warnings.catch_warnings():
            # torch warns that .grad then references its own graph; the cycle is broken when
            # zero_grad sets .grad to None, which Lightning does before every backward pass.
            warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
            super().backward(loss, *args, **{**kwargs, "create_graph": True})

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        self._backward_passes = 0

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.log("train/passes_per_step", float(self._backward_passes))
        self.algorithm.update_count += 1
        trainer = self.trainer
        if 0 < trainer.max_steps <= trainer.global_step:
            # Lightning validates on multiples of val_check_interval only; a stop request makes
            # it validate now, so a max_steps the interval does not divide still gets its last
            # steps validated (and selectable). On a multiple it validates once, as it would.
            trainer.should_stop = True

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
        by_role: dict[str, list[torch.Tensor]] = {}
        for (name, role), metric in zip(self.eval_roles.items(), self.eval_accuracy):
            if not metric.update_called:
                continue
            accuracy = metric.compute()
            metric.reset()
            # compute() already gathered every replica's counts; sync_dist only tells Lightning so.
            self.log(accuracy_key(stage, name), accuracy, sync_dist=True)
            by_role.setdefault(role, []).append(accuracy)
        for role, prog_bar in (("source", True), ("target", False)):
            if by_role.get(role):
                self.log(f"{stage}/{role}_acc", torch.stack(by_role[role]).mean(), prog_bar=prog_bar, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracies("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracies("test")

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        optimizers = self.algorithm.configure_optimizers(self.network, self.optimizer_factory)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            name = type(optimizer).__name__
            if evaluates_closure(optimizer) and not self.automatic_optimization:
                raise UserInputError(
                    f"optimizer {name} re-evaluates the loss through a closure, but algorithm "
                    f"{type(self.algorithm).__name__} steps its optimizers itself without one "
                    "(manual optimization); choose another optimizer or algorithm"
                )
            uses_closure_or_hessian = evaluates_closure(optimizer) or differentiates_gradient(optimizer)
            if uses_closure_or_hessian and self.trainer.precision == "16-mixed":
                raise UserInputError(
                    f"optimizer {name} does not work with trainer.precision=16-mixed (its gradient "
                    "scaler steps without a closure and scales the gradient); use bf16-mixed or 32-true"
                )
        return optimizers


@contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in ``module`` keep their running statistics (momentum 0) in the block."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
