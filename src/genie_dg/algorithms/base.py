"""The seam between the LightningModule and a DG method."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from genie_dg.errors import UserInputError

if TYPE_CHECKING:
    from lightning import LightningModule

OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass
class DomainBatch:
    """One training domain's minibatch of a step."""

    x: torch.Tensor
    y: torch.Tensor
    domain: int


@dataclass
class AlgorithmOutput:
    """The loss of the step and named scalars to log under ``train/``.

    ``reset_optimizer`` asks the module to clear the optimizers' state before this step's
    update (DomainBed does so when IRM's or VREx's penalty weight jumps at the annealing step).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    reset_optimizer: bool = False


class DGAlgorithm(nn.Module):
    """Base of every DG method: turns one step's per-domain minibatches into a loss.

    A method implements :meth:`training_loss` (the module back-propagates the loss and steps
    the optimizer, so closure-based optimizers such as SAM re-evaluate the whole loss, penalties
    included). A method that needs several optimizers or inner updates sets
    ``automatic_optimization = False`` and implements :meth:`manual_step` with Lightning's
    manual optimization instead; it then makes exactly one optimizer step per training step,
    so ``trainer.max_steps`` still counts training steps.

    Extra networks are submodules, so they are checkpointed and, through
    :meth:`configure_optimizers`, optimized. ``update_count`` (a buffer, so it is checkpointed)
    counts the finished training steps, as DomainBed's ``update_count``; the module increments it.

    ``min_domains`` is the number of training domains the penalty needs; with fewer,
    construction fails unless ``allow_degenerate=True``, which only warns that the penalty is
    inactive.
    """

    min_domains: ClassVar[int] = 1
    automatic_optimization: ClassVar[bool] = True

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        input_shape: Sequence[int] | None = None,
        allow_degenerate: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.penalty_active = num_domains >= self.min_domains
        if not self.penalty_active:
            message = (
                f"{name} needs at least {self.min_domains} training domains for its penalty but "
                f"got {num_domains}"
            )
            if not allow_degenerate:
                raise UserInputError(
                    f"{message}; train on more domains, use algorithm=erm, or set "
                    "algorithm.allow_degenerate=true to run with the penalty inactive"
                )
            warnings.warn(f"{message}; the penalty is inactive (allow_degenerate=true)", stacklevel=2)
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.num_features = num_features
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))

    def setup_network(self, network: nn.Module) -> None:
        """Called once with the classifier before training; a method may adapt it in place
        (e.g. insert MixStyle layers) or keep copies of it (e.g. MIRO's frozen featurizer)."""

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        """The loss to minimise for this step (automatic optimization)."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_loss")

    def manual_step(self, module: LightningModule, batches: list[DomainBatch]) -> AlgorithmOutput:
        """Back-propagate and step ``module.optimizers()`` itself (manual optimization)."""
        raise NotImplementedError(f"{type(self).__name__} must implement manual_step")

    def predict(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Class logits used for validation and test."""
        return network(x)

    def configure_optimizers(
        self, network: nn.Module, optimizer: OptimizerFactory
    ) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        """One optimizer over the network and this method's own parameters, by default."""
        return optimizer(_unique([*network.parameters(), *self.parameters()]))


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out.append(p)
    return out


def hparam(value: Any, name: str, check: Callable[[Any], bool], expected: str, owner: str) -> Any:
    """Return ``value`` or raise a ``UserInputError`` naming ``algorithm.<name>`` and the range."""
    if not check(value):
        raise UserInputError(f"{owner}: invalid algorithm.{name}={value!r}; expected {expected}")
    return value
