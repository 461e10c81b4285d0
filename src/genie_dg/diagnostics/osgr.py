"""One-step generalization ratio (OSGR): measured on held-out data, and estimated from gradients.

For one update ``theta -> theta'`` the OSGR (paper Eq. 1) is

    OSGR = [L_heldout(theta) - L_heldout(theta')] / [L_train(theta) - L_train(theta')]

where ``L_train`` is the loss on the batch whose gradient made the update and ``L_heldout`` the
loss on data the update never saw. :func:`measure_one_step_decrease` makes the update the
optimizer is about to make, measures both decreases and puts everything back.
:func:`estimated_osgr` predicts the same ratio from per-coordinate gradient statistics
(:func:`gradient_statistics`) and the optimizer's preconditioner (:func:`preconditioners`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.optim import Optimizer

from genie_dg.optim.genie import GENIE, Hyperparameters, preconditioner

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


@contextmanager
def rng_preserved(tensors: Iterable[Tensor]) -> Iterator[None]:
    """Restore the CPU generator, and the CUDA generators of ``tensors``' devices, on exit.

    Dropout and optimizers that draw from the global generator would otherwise shift every
    later draw of training.
    """
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        yield


@contextmanager
def preserved_training_state(module: nn.Module, optimizer: Optimizer) -> Iterator[None]:
    """Undo, on exit, whatever a trial forward pass or optimizer step changed.

    Restored: the parameters of ``module`` and of ``optimizer`` (values and ``.grad``), the
    buffers of ``module`` (BatchNorm running statistics), the optimizer's state through its
    ``state_dict`` (so GENIE's generator states too) and the global random generators.
    """
    params = list({id(p): p for p in [*module.parameters(), *_optimizer_params(optimizer)]}.values())
    buffers = list(module.buffers())
    saved_params = [p.detach().clone() for p in params]
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in buffers]
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    groups = optimizer.param_groups
    saved_groups = [dict(group) for group in groups]
    try:
        with rng_preserved(params):
            yield
    finally:
        with torch.no_grad():
            for param, value, gradient in zip(params, saved_params, saved_grads):
                param.copy_(value)
                # In place: data-parallel gradient buckets may view .grad.
                if gradient is None or param.grad is None:
                    param.grad = gradient
                else:
                    param.grad.copy_(gradient)
            for buffer, value in zip(buffers, saved_buffers):
                buffer.copy_(value)
        optimizer.load_state_dict(saved_optimizer)
        # load_state_dict builds new group dicts (and adds torch's defaults to them); put back
        # the original dicts, which wrapping optimizers and schedulers may hold, as they were.
        for group, saved in zip(groups, saved_groups):
            group.clear()
            group.update(saved)
        optimizer.param_groups = groups


def _optimizer_params(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@dataclass(frozen=True)
class OneStepDecrease:
    """Loss decreases of one update: on the training batch and on each held-out batch."""

    train: float
    heldout: dict[str, float]

    def osgr(self, name: str) -> float:
        """Eq. 1 for held-out batch ``name`` (NaN when the training loss did not change)."""
        return self.heldout[name] / self.train if self.train != 0.0 else float("nan")


def _loss(module: nn.Module, batch: Batch, loss_fn: LossFn) -> float:
    # Every evaluation starts from the same generator state, so dropout draws the same masks
    # before and after the update and the difference is the update's alone.
    with torch.no_grad(), rng_preserved(batch):
        return float(loss_fn(module(batch[0]), batch[1]))


def measure_one_step_decrease(
    module: nn.Module,
    optimizer: Optimizer,
    train_batch: Batch,
    heldout_batches: Mapping[str, Batch],
    loss_fn: LossFn = F.cross_entropy,
) -> OneStepDecrease:
    """Loss decreases of the update ``optimizer.step()`` makes from the gradients now in ``.grad``.

    Losses are evaluated in ``module``'s current mode (training mode during training, so
    BatchNorm normalises each batch by its own statistics, as the step's gradient did). The
    step is real and then undone (:func:`preserved_training_state`): nothing of it remains.
    Optimizers that need a closure (SAM) or a gradient graph (AdaHessian) cannot make this step.
    """
    with preserved_training_state(module, optimizer):
        before_train = _loss(module, train_batch, loss_fn)
        before = {name: _loss(module, batch, loss_fn) for name, batch in heldout_batches.items()}
        with rng_preserved(_optimizer_params(optimizer)):
            optimizer.step()
        after_train = _loss(module, train_batch, loss_fn)
        after = {name: _loss(module, batch, loss_fn) for name, batch in heldout_batches.items()}
    return OneStepDecrease(
        train=before_train - after_train,
        heldout={name: before[name] - after[name] for name in heldout_batches},
    )


@dataclass(frozen=True)
class GradientStatistics:
    """Per-coordinate mean and unbiased variance of ``units`` unit gradients.

    A unit is one sample or one micro-batch of the step's batch; the mean of the units'
    gradients is the step's gradient.
    """

    mean: dict[str, Tensor]
    variance: dict[str, Tensor]
    units: int

    def gsnr(self) -> dict[str, Tensor]:
        """Bias-corrected GSNR ``r = mean^2 / var - 1/n`` per coordinate (NaN where var = 0).

        ``mean^2`` of n units overestimates the squared expected gradient by ``var/n`` on
        average; the correction removes that, so ``r`` may be slightly negative.
        """
        return {
            name: torch.where(var > 0, self.mean[name].square() / var - 1.0 / self.units, torch.nan)
            for name, var in self.variance.items()
        }


def gradient_statistics(
    module: nn.Module,
    parameters: Mapping[str, nn.Parameter],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    samples_per_unit: int = 1,
    units_per_chunk: int = 8,
) -> GradientStatistics:
    """Statistics of the per-unit gradients of ``loss_fn(module(x_u), y_u)`` w.r.t. ``parameters``.

    ``parameters`` maps names of ``module.named_parameters()`` to the tensors to differentiate.
    The batch is cut into units of ``samples_per_unit`` consecutive samples (a remainder is
    left out); ``torch.func`` computes ``units_per_chunk`` unit gradients at once (vmap of
    grad) and the running mean and sum of squared deviations are merged chunk by chunk
    (Chan et al.), so memory stays at one chunk of gradients. Each unit runs on its own copy
    of the buffers: BatchNorm, which needs more than one sample per channel in training mode,
    then normalises a micro-batch by its own statistics and its running statistics never
    reach ``module``. Dropout draws from the global generator, which is restored afterwards.
    """
    units = len(x) // samples_per_unit
    if units < 2:
        raise ValueError(f"{len(x)} samples make {units} unit(s) of {samples_per_unit}: a variance needs at least 2")
    xs = x[: units * samples_per_unit].reshape(units, samples_per_unit, *x.shape[1:])
    ys = y[: units * samples_per_unit].reshape(units, samples_per_unit, *y.shape[1:])
    trainable = {name: p.detach() for name, p in parameters.items()}
    fixed = {name: p.detach() for name, p in module.named_parameters() if name not in trainable}
    buffers = dict(module.named_buffers())

    def unit_loss(params: dict[str, Tensor], unit_buffers: dict[str, Tensor], xu: Tensor, yu: Tensor) -> Tensor:
        return loss_fn(functional_call(module, {**params, **fixed, **unit_buffers}, (xu,)), yu)

    per_unit_grads = vmap(grad(unit_loss), in_dims=(None, 0, 0, 0), randomness="different")
    count = 0
    mean: dict[str, Tensor] = {}
    squared_deviations: dict[str, Tensor] = {}
    with rng_preserved([x, *trainable.values()]):
        for start in range(0, units, units_per_chunk):
            chunk_x, chunk_y = xs[start : start + units_per_chunk], ys[start : start + units_per_chunk]
            size = len(chunk_x)
            unit_buffers = {name: b.unsqueeze(0).expand(size, *b.shape).clone() for name, b in buffers.items()}
            grads = per_unit_grads(trainable, unit_buffers, chunk_x, chunk_y)
            total = count + size
            for name, g in grads.items():
                chunk_mean = g.mean(0)
                chunk_deviations = (g - chunk_mean).square().sum(0)
                if count == 0:
                    mean[name], squared_deviations[name] = chunk_mean, chunk_deviations
                    continue
                delta = chunk_mean - mean[name]
                mean[name] = mean[name] + delta * (size / total)
                squared_deviations[name] = (
                    squared_deviations[name] + chunk_deviations + delta.square() * (count * size / total)
                )
            count = total
    variance = {name: sd / (units - 1) for name, sd in squared_deviations.items()}
    return GradientStatistics(mean=mean, variance=variance, units=units)


def preconditioners(
    optimizers: Iterable[Optimizer], parameters: Mapping[str, nn.Parameter]
) -> dict[str, Tensor | None]:
    """The factor ``p`` each optimizer applies per coordinate to its gradient estimate.

    ``None`` stands for p = 1 everywhere: SGD, any optimizer not listed here, and any
    optimizer before its first step. GENIE: ``psi * lam`` of its last update (recomputed from
    ``m``, ``s`` and ``step`` by the formulas GENIE.statistics uses; 1 with
    ``preconditioning=False``). Adam family (state ``exp_avg_sq``, group ``betas``):
    ``1 / (sqrt(v_hat) + eps)`` with ``v_hat`` the bias-corrected second moment (its running
    maximum under amsgrad). Parameters no optimizer holds are never updated: p = 0.
    """
    holder: dict[int, tuple[Optimizer, dict]] = {}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                holder[id(param)] = (optimizer, group)
    out: dict[str, Tensor | None] = {}
    for name, param in parameters.items():
        if id(param) not in holder:
            out[name] = torch.zeros_like(param)
            continue
        optimizer, group = holder[id(param)]
        out[name] = _preconditioner(optimizer, group, optimizer.state.get(param) or {})
    return out


def _preconditioner(optimizer: Optimizer, group: dict, state: dict) -> Tensor | None:
    if not state or float(state.get("step", 0)) == 0:
        return None
    step = int(state["step"])
    if isinstance(optimizer, GENIE):
        hp = Hyperparameters.of_group(group)
        if not hp.preconditioning:
            return None
        return preconditioner(state["m"], state["s"], step, beta=hp.beta, eps=hp.eps, variant=hp.variant).factor
    if "exp_avg_sq" in state and "betas" in group:
        second_moment = state.get("max_exp_avg_sq", state["exp_avg_sq"])
        bias_correction = 1.0 - group["betas"][1] ** step
        return 1.0 / ((second_moment / bias_correction).sqrt() + group["eps"])
    return None


def estimated_osgr(statistics: GradientStatistics, preconditioner: Mapping[str, Tensor | None]) -> float:
    """OSGR predicted from gradient statistics (docs/genie.md, after paper Eq. 2).

        R = 1 - (1/n) sum_j W_j / (r_j + 1/n),   W_j = p_j E[g_j^2] / sum_k p_k E[g_k^2]

    with n units, r_j the bias-corrected GSNR (:meth:`GradientStatistics.gsnr`) and
    ``E[g_j^2]``, the expected square of a step's gradient (mean of n units), estimated by its
    unbiased estimate ``mean_j^2``. Then ``r_j + 1/n = mean_j^2 / var_j`` and
    ``W_j / (r_j + 1/n) = p_j var_j / sum_k p_k mean_k^2``, so

        R = 1 - sum_j p_j var_j / (n sum_j p_j mean_j^2),

    the form computed here: it never divides by a variance that may be zero. The numerator
    ``sum p (mean^2 - var/n)`` estimates the expected held-out decrease ``sum p E[g]^2``, the
    denominator the expected training decrease ``sum p E[g^2]`` (both up to the step size).
    NaN when every weighted squared mean is zero.
    """
    weighted_variance = 0.0
    weighted_square = 0.0
    for name, mean in statistics.mean.items():
        p = preconditioner.get(name)
        weights = torch.ones_like(mean) if p is None else p
        weighted_variance += float((weights * statistics.variance[name]).sum(dtype=torch.float64))
        weighted_square += float((weights * mean.square()).sum(dtype=torch.float64))
    if weighted_square == 0.0:
        return float("nan")
    return 1.0 - weighted_variance / (statistics.units * weighted_square)
