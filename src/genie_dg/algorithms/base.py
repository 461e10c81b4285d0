"""The seam between the LightningModule and a DG method, the bases that families of methods
share (:class:`FeatureMatching` for CORAL and MMD, :class:`AnnealedPenalty` for IRM, VREx and
Fishr) and the helpers several methods use (:func:`pooled`, :func:`build_inner_optimizer`,
:func:`refuse_second_order`)."""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.data.multidomain import DomainBatch
from genie_dg.errors import UserInputError
from genie_dg.optim import differentiates_gradient

OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass
class AlgorithmOutput:
    """The loss of the step and named scalars to log under ``train/``.

    ``reset_optimizer`` asks the module to clear the optimizers' state before this step's
    update (DomainBed does so when the penalty weight of IRM, VREx or Fishr jumps at the
    annealing step, see :class:`AnnealedPenalty`).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    reset_optimizer: bool = False


@dataclass(frozen=True)
class StepContext:
    """What a manually optimized method gets of the training loop for one step.

    ``optimizers`` come in the order :meth:`DGAlgorithm.configure_optimizers` returned them
    (Lightning's wrappers during training). ``backward`` back-propagates a loss the way the
    loop does (``LightningModule.manual_backward``: mixed-precision scaling, DDP's gradient
    averaging, ``create_graph`` for optimizers that differentiate the gradient), so a method
    calls it instead of ``loss.backward()``.
    """

    network: nn.Module
    optimizers: Sequence[torch.optim.Optimizer]
    backward: Callable[[torch.Tensor], None]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The one optimizer of a method that configures one."""
        if len(self.optimizers) != 1:
            raise ValueError(f"this step has {len(self.optimizers)} optimizers, not one")
        return self.optimizers[0]


class DGAlgorithm(nn.Module):
    """Base of every DG method: turns one step's per-domain minibatches into a loss.

    A method implements :meth:`training_loss` (the module back-propagates the loss and steps
    the optimizer, so closure-based optimizers such as SAM re-evaluate the whole loss, penalties
    included). A method that needs several optimizers or inner updates sets
    ``automatic_optimization = False`` and implements :meth:`manual_step` with Lightning's
    manual optimization instead (it gets a :class:`StepContext`, not the LightningModule); it
    then makes exactly one optimizer step per training step,
    so ``trainer.max_steps`` still counts training steps.

    Extra networks are submodules, so they are checkpointed and, through
    :meth:`configure_optimizers`, optimized. ``update_count`` (a buffer, so it is checkpointed)
    counts the finished training steps, as DomainBed's ``update_count``; the module increments it.

    ``min_domains`` is the number of training domains the penalty needs; with fewer,
    construction fails unless ``allow_degenerate=True``, which only warns that the penalty is
    inactive. A method whose steps leave some parameters without a gradient (DANN's
    discriminator steps) sets ``leaves_parameters_unused``: DDP must then look for them.
    """

    min_domains: ClassVar[int] = 1
    automatic_optimization: ClassVar[bool] = True
    leaves_parameters_unused: ClassVar[bool] = False

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
            message = f"{name} needs at least {self.min_domains} training domains for its penalty but got {num_domains}"
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

    def manual_step(self, step: StepContext, batches: list[DomainBatch]) -> AlgorithmOutput:
        """Back-propagate with ``step.backward`` and step ``step.optimizers`` itself (manual
        optimization)."""
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


def replica_mean(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the processes of a running ``torch.distributed`` job (a DDP run's
    replicas), or ``values`` themselves outside one; detached either way."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values.detach()
    total = values.detach().clone()
    torch.distributed.all_reduce(total)
    return total / torch.distributed.get_world_size()


def hparam(value: Any, name: str, check: Callable[[Any], bool], expected: str, owner: str) -> Any:
    """Return ``value`` or raise a ``UserInputError`` naming ``algorithm.<name>`` and the range."""
    if not check(value):
        raise UserInputError(f"{owner}: invalid algorithm.{name}={value!r}; expected {expected}")
    return value


def pooled(batches: Sequence[DomainBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """All domains' samples and labels of a step as one batch, in domain order."""
    return torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches])


def refuse_second_order(algorithm: str, optimizer: torch.optim.Optimizer) -> None:
    """Raise for an optimizer that differentiates the gradient (AdaHessian, GAM): an update
    composed from copies of the network is no loss's gradient, it has no Hessian to take."""
    if differentiates_gradient(optimizer):
        raise UserInputError(
            f"{algorithm} composes its update from copies of the network, so optimizer "
            f"{type(optimizer).__name__} has no Hessian to take; choose a first-order optimizer"
        )


def build_inner_optimizer(factory: OptimizerFactory, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The configured optimizer over a network copy's parameters, for inner updates (MLDG, Fish).

    An optimizer with its own seed (GENIE) gets one drawn from torch's generator: with the
    configured seed its noise and mask would repeat the outer optimizer's and, when built
    afresh each step, repeat themselves every step.
    """
    if "seed" in inspect.signature(factory).parameters:
        return factory(params, seed=int(torch.randint(2**62, ())))
    return factory(params)


class FeatureMatching(DGAlgorithm):
    """Mean per-domain cross-entropy plus ``mmd_gamma`` times :meth:`distance` between two
    domains' features, averaged over all pairs of training domains (DomainBed's ``AbstractMMD``,
    the base of its CORAL and MMD).

    Each domain's features come from its own forward pass, as in DomainBed, so batch
    normalisation sees one domain at a time. A subclass provides :meth:`distance` and
    ``penalty_name``, the metric the mean distance is logged under. With a single domain
    (``allow_degenerate=true``) there is no pair and the penalty is 0, which is ERM.
    """

    min_domains = 2
    penalty_name: ClassVar[str]

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        mmd_gamma: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        owner = type(self).__name__
        self.mmd_gamma = hparam(mmd_gamma, "mmd_gamma", lambda v: v >= 0, "mmd_gamma >= 0", owner)

    @staticmethod
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The distance between two domains' features (``(n_a, D)`` and ``(n_b, D)``)."""
        raise NotImplementedError("a FeatureMatching method must define distance")

    def training_loss(self, network: nn.Module, batches: list[DomainBatch]) -> AlgorithmOutput:
        features = [network.features(b.x) for b in batches]
        classification = torch.stack([F.cross_entropy(network.head(f), b.y) for f, b in zip(features, batches)]).mean()
        pairs = list(itertools.combinations(features, 2))
        penalty = torch.stack([self.distance(a, b) for a, b in pairs]).mean() if pairs else classification.new_zeros(())
        return AlgorithmOutput(
            classification + self.mmd_gamma * penalty,
            {"classification_loss": classification.detach(), self.penalty_name: penalty.detach()},
        )


class AnnealedPenalty(DGAlgorithm):
    """Base of the methods whose penalty weight switches once, at an annealing step, as
    DomainBed's IRM, VREx and Fishr.

    :meth:`penalty_schedule` gives the weight: ``weight_before_anneal`` for the first
    ``<prefix>_penalty_anneal_iters`` training steps and ``<prefix>_lambda`` from then on (each
    method names these two hyper-parameters after itself; :meth:`schedule_hparams` checks them).
    DomainBed also rebuilds its Adam optimizer at the switching step, because the jump in
    gradient magnitude upsets Adam's moment estimates; ``reset_optimizer_on_anneal=True`` (the
    default, DomainBed's behaviour) does the same here by asking the module to clear the
    optimizer's state at that step, whatever the optimizer (GENIE's moving averages face the
    same jump): once, even when a closure-based optimizer evaluates the loss twice in that
    step, and not at step 0 unless ``reset_at_step_zero``. Clearing the state of a
    ``torch.optim`` optimizer is what rebuilding it does: its state is created afresh at the
    next step, with the same hyper-parameters. ``False`` keeps the state across the switch.
    """

    min_domains = 2
    weight_before_anneal: ClassVar[float] = 1.0
    reset_at_step_zero: ClassVar[bool] = True

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        reset_optimizer_on_anneal: bool = True,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        self.reset_optimizer_on_anneal = hparam(
            reset_optimizer_on_anneal,
            "reset_optimizer_on_anneal",
            lambda v: isinstance(v, bool),
            "true or false",
            type(self).__name__,
        )
        # A closure-based optimizer evaluates the loss twice in a step; reset only on the first.
        self._reset_at_step: int | None = None

    def schedule_hparams(self, prefix: str, penalty_lambda: float, anneal_iters: int) -> tuple[float, int]:
        """``penalty_lambda`` and ``anneal_iters``, checked as ``algorithm.<prefix>_lambda`` (at
        least 0) and ``algorithm.<prefix>_penalty_anneal_iters`` (an integer, at least 0)."""
        owner = type(self).__name__
        return (
            hparam(penalty_lambda, f"{prefix}_lambda", lambda v: v >= 0, f"{prefix}_lambda >= 0", owner),
            hparam(
                anneal_iters,
                f"{prefix}_penalty_anneal_iters",
                lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                "an integer >= 0",
                owner,
            ),
        )

    def penalty_schedule(self, penalty_lambda: float, anneal_iters: int) -> tuple[float, bool]:
        """This step's penalty weight, and whether the optimizer's state is to be cleared before
        its update (true once, at step ``anneal_iters``, when ``reset_optimizer_on_anneal``)."""
        step = int(self.update_count)
        weight = penalty_lambda if step >= anneal_iters else self.weight_before_anneal
        reset = (
            self.reset_optimizer_on_anneal
            and step == anneal_iters
            and (step != 0 or self.reset_at_step_zero)
            and self._reset_at_step != step
        )
        if reset:
            self._reset_at_step = step
        return weight, reset
