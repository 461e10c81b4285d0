"""DANN (Ganin et al., 2016, "Domain-Adversarial Training of Neural Networks") and CDANN
(Li et al., 2018, "Deep Domain Generalization via Conditional Invariant Adversarial Networks")
as DomainBed defines them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from genie_dg.algorithms.base import (
    AlgorithmOutput,
    DGAlgorithm,
    DomainBatch,
    OptimizerFactory,
    StepContext,
    hparam,
    pooled,
)


def discriminator_mlp(inputs: int, outputs: int, width: int, depth: int, dropout: float) -> nn.Sequential:
    """DomainBed's ``networks.MLP``: ``depth`` linear layers, each but the last followed by
    dropout and a ReLU."""
    widths = [inputs] + [width] * (depth - 1)
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(n_in, n_out), nn.Dropout(dropout), nn.ReLU()]
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def class_balanced_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed with weight ``1 / (n_c * C)`` per sample of class ``c``.

    ``C`` is the highest class label in the batch plus one, as DomainBed's ``F.one_hot(y)``
    infers it; when every class is present the weights sum to one.
    """
    counts = torch.bincount(classes)
    weights = 1.0 / (counts[classes] * len(counts)).to(logits.dtype)
    return (weights * F.cross_entropy(logits, targets, reduction="none")).sum()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _optional(check: Callable[[float], bool]) -> Callable[[Any], bool]:
    """A check that also accepts ``None`` (``null``: take the optimizer's own value)."""
    return lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and check(v))


class AbstractDANN(DGAlgorithm):
    """Adversarial feature alignment: a discriminator MLP learns to tell the training domains
    apart from the features, the network learns to classify while fooling it.

    As DomainBed's ``AbstractDANN``: two optimizers, the discriminator's (over the MLP and, for
    CDANN, the class embeddings; ``lr_d``, ``weight_decay_d``) and the generator's (over the
    network; ``lr_g``, ``weight_decay_g``). A training step is either a discriminator step, which
    minimises the discriminator loss (domain cross-entropy plus ``grad_penalty`` times the mean
    squared norm of its gradient with respect to the discriminator's input), or a generator
    step, which minimises ``classification - dann_lambda * discriminator loss``. With DomainBed's
    counter ``t = update_count + 1`` (DomainBed increments it before choosing), step ``t`` is a
    discriminator step when ``t % (1 + d_steps_per_g_step) < d_steps_per_g_step``: the first step
    is a generator step and then ``d_steps_per_g_step`` discriminator steps follow each generator
    step. Exactly one of the two optimizers steps per training step. ``step.optimizers`` is
    ``[discriminator optimizer, generator optimizer]``.

    Both optimizers are the configured optimizer (``optimizer_factory``); ``lr_d``, ``lr_g`` and
    ``weight_decay_g`` left ``null`` take the optimizer's own values (DomainBed's defaults equal
    its ``lr`` and ``weight_decay`` defaults). DomainBed's Adam uses ``betas=(beta1, 0.9)``:
    optimizers with ``betas`` (Adam, AdamW) get the same; others (GENIE, SGD) have no such
    setting and ignore ``beta1``. ``beta1: null`` keeps the optimizer's own betas.

    Deviations: DomainBed's ``lambda`` is named ``dann_lambda`` (a Python keyword); the
    discriminator step runs the featurizer without gradient (DomainBed back-propagates into it
    but never applies that gradient, so the updates are the same); the gradient penalty is
    skipped when ``grad_penalty=0`` (DomainBed computes it and multiplies it by zero); plain
    DANN has no class embeddings (DomainBed creates them and never uses them). With a single
    training domain (``allow_degenerate=true``) every step is a generator step on the
    classification loss alone, which is ERM.

    A discriminator step leaves the network without gradient, so under DistributedDataParallel
    the run looks for unused parameters (``leaves_parameters_unused``).
    """

    min_domains = 2
    automatic_optimization = False
    leaves_parameters_unused = True
    conditional: ClassVar[bool]
    class_balance: ClassVar[bool]

    def __init__(
        self,
        num_classes: int,
        num_domains: int,
        num_features: int,
        dann_lambda: float = 1.0,
        d_steps_per_g_step: int = 1,
        grad_penalty: float = 0.0,
        beta1: float | None = 0.5,
        mlp_width: int = 256,
        mlp_depth: int = 3,
        mlp_dropout: float = 0.0,
        lr_d: float | None = None,
        lr_g: float | None = None,
        weight_decay_d: float | None = 0.0,
        weight_decay_g: float | None = None,
        **base: Any,
    ) -> None:
        super().__init__(num_classes, num_domains, num_features, **base)
        owner = type(self).__name__
        self.dann_lambda = hparam(dann_lambda, "dann_lambda", lambda v: v >= 0, "dann_lambda >= 0", owner)
        self.d_steps_per_g_step = hparam(
            d_steps_per_g_step, "d_steps_per_g_step", _positive_int, "an integer >= 1", owner
        )
        self.grad_penalty = hparam(grad_penalty, "grad_penalty", lambda v: v >= 0, "grad_penalty >= 0", owner)
        self.beta1 = hparam(beta1, "beta1", _optional(lambda v: 0 <= v < 1), "null or 0 <= beta1 < 1", owner)
        hparam(mlp_width, "mlp_width", _positive_int, "an integer >= 1", owner)
        hparam(
            mlp_depth,
            "mlp_depth",
            lambda v: _positive_int(v) and v >= 2,
            "an integer >= 2 (input and output layers)",
            owner,
        )
        hparam(mlp_dropout, "mlp_dropout", lambda v: 0 <= v < 1, "0 <= mlp_dropout < 1", owner)
        self.lr_d = hparam(lr_d, "lr_d", _optional(lambda v: v > 0), "null or lr_d > 0", owner)
        self.lr_g = hparam(lr_g, "lr_g", _optional(lambda v: v > 0), "null or lr_g > 0", owner)
        self.weight_decay_d = hparam(
            weight_decay_d, "weight_decay_d", _optional(lambda v: v >= 0), "null or weight_decay_d >= 0", owner
        )
        self.weight_decay_g = hparam(
            weight_decay_g, "weight_decay_g", _optional(lambda v: v >= 0), "null or weight_decay_g >= 0", owner
        )
        self.discriminator = discriminator_mlp(num_features, num_domains, mlp_width, mlp_depth, mlp_dropout)
        if self.conditional:
            self.class_embeddings = nn.Embedding(num_classes, num_features)

    def configure_optimizers(self, network: nn.Module, optimizer: OptimizerFactory) -> list[torch.optim.Optimizer]:
        discriminator = self._optimizer(optimizer, self.parameters(), self.lr_d, self.weight_decay_d)
        generator = self._optimizer(optimizer, network.parameters(), self.lr_g, self.weight_decay_g)
        return [discriminator, generator]

    def _optimizer(
        self, factory: OptimizerFactory, params: Any, lr: float | None, weight_decay: float | None
    ) -> torch.optim.Optimizer:
        params = [p for p in params if p.requires_grad]
        overrides = {k: v for k, v in (("lr", lr), ("weight_decay", weight_decay)) if v is not None}
        built = factory(params, **overrides)
        if self.beta1 is not None and "betas" in built.defaults:
            built = factory(params, **overrides, betas=(self.beta1, 0.9))
        return built

    def is_discriminator_step(self, step: int) -> bool:
        """Whether training step ``step`` (0-based, the ``update_count`` before it) trains the
        discriminator."""
        cycle = 1 + self.d_steps_per_g_step
        return self.penalty_active and (step + 1) % cycle < self.d_steps_per_g_step

    def discriminator_loss(
        self, features: torch.Tensor, y: torch.Tensor, domains: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The discriminator's loss on ``features`` and its gradient penalty (``None`` when
        ``grad_penalty`` is 0)."""
        disc_input = features + self.class_embeddings(y) if self.conditional else features
        logits = self.discriminator(disc_input)
        if self.class_balance:
            loss = class_balanced_cross_entropy(logits, domains, y)
        else:
            loss = F.cross_entropy(logits, domains)
        if self.grad_penalty == 0:
            return loss, None
        (input_grad,) = torch.autograd.grad(
            F.cross_entropy(logits, domains, reduction="sum"), [disc_input], create_graph=True
        )
        penalty = input_grad.pow(2).sum(1).mean(0)
        return loss + self.grad_penalty * penalty, penalty

    def manual_step(self, step: StepContext, batches: list[DomainBatch]) -> AlgorithmOutput:
        discriminator_optimizer, generator_optimizer = step.optimizers
        network = step.network
        x, y = pooled(batches)
        # The discriminator classifies the position of the domain among the training domains.
        domains = torch.cat([torch.full_like(b.y, i) for i, b in enumerate(batches)])

        if self.is_discriminator_step(int(self.update_count)):
            with torch.no_grad():
                features = network.features(x)
                classification = F.cross_entropy(network.head(features), y)
            # A leaf that requires grad, so the penalty can differentiate with respect to it.
            disc_loss, penalty = self.discriminator_loss(features.requires_grad_(), y, domains)
            discriminator_optimizer.zero_grad()
            step.backward(disc_loss)
            discriminator_optimizer.step()
            return AlgorithmOutput(disc_loss.detach(), self._metrics(classification, disc_loss, penalty, True))

        features = network.features(x)
        classification = F.cross_entropy(network.head(features), y)
        loss, disc_loss, penalty = classification, None, None
        if self.penalty_active:
            disc_loss, penalty = self.discriminator_loss(features, y, domains)
            loss = classification - self.dann_lambda * disc_loss
        discriminator_optimizer.zero_grad()
        generator_optimizer.zero_grad()
        step.backward(loss)
        generator_optimizer.step()
        return AlgorithmOutput(loss.detach(), self._metrics(classification, disc_loss, penalty, False))

    @staticmethod
    def _metrics(
        classification: torch.Tensor,
        disc_loss: torch.Tensor | None,
        penalty: torch.Tensor | None,
        discriminator_step: bool,
    ) -> dict[str, torch.Tensor]:
        metrics = {
            "classification_loss": classification.detach(),
            "discriminator_step": classification.new_tensor(float(discriminator_step)),
        }
        if disc_loss is not None:
            metrics["discriminator_loss"] = disc_loss.detach()
        if penalty is not None:
            metrics["discriminator_grad_penalty"] = penalty.detach()
        return metrics


class DANN(AbstractDANN):
    """Unconditional DANN: the discriminator sees the features alone (DomainBed's ``DANN``)."""

    conditional = False
    class_balance = False


class CDANN(AbstractDANN):
    """Conditional DANN: the discriminator sees the features plus a learned embedding of the
    class, and its loss weighs each class equally (DomainBed's ``CDANN``)."""

    conditional = True
    class_balance = True
