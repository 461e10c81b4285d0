"""GENIE's formulas, written once; every update path and the diagnostics call them.

The derivation and the two variants are in ``docs/genie.md``. Scalars that depend only on the
step count are computed on the host (:func:`step_scalars`); the elementwise part
(:func:`reference_factor`, :func:`algorithm1_factor`) is plain tensor code that runs eagerly
on a tensor or a slice of one, and inside the ``torch.compile``d kernel, where its scalars are
0-dim tensors and ``tanh`` is :func:`tanh_nonnegative`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

VARIANTS = ("reference", "algorithm1")
LOW_PRECISION = (torch.bfloat16, torch.float16)
# tanh(x) for x > ~9.01 is exactly 1 in float32; the reference clamps 1/var at 10.
INV_VAR_CAP = 10.0
Scalar = float | Tensor


@dataclass(frozen=True)
class Hyperparameters:
    """One parameter group's hyper-parameters as the update paths read them."""

    lr: float = 0.015
    beta: float = 0.95
    p: float = 0.4
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    eps: float = 1e-8
    variant: str = "reference"
    preconditioning: bool = True
    noise: bool = True
    mask: bool = True
    noise_std: float = 1e-3
    maximize: bool = False

    @classmethod
    def of_group(cls, group: dict[str, Any]) -> Hyperparameters:
        """The hyper-parameters of an optimizer's parameter group (a tensor ``lr`` becomes a float)."""
        return cls(
            lr=float(group["lr"]),
            beta=float(group["beta"]),
            p=float(group["p"]),
            weight_decay=float(group["weight_decay"]),
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            eps=float(group["eps"]),
            variant=group["variant"],
            preconditioning=bool(group["preconditioning"]),
            noise=bool(group["noise"]),
            mask=bool(group["mask"]),
            noise_std=float(group["noise_std"]),
            maximize=bool(group["maximize"]),
        )

    @property
    def use_mask(self) -> bool:
        return self.mask and self.p > 0.0


class StepScalars(NamedTuple):
    """Host scalars of step ``t``: ``1/c`` with ``c = 1 - beta^t``, ``rho``, and ``k = 1/(1-rho)``,
    which is 0 where no variance estimate exists (``t == 1`` or ``rho == 1``)."""

    inv_c: float
    rho: float
    k: float

    @property
    def has_variance(self) -> bool:
        return self.k != 0.0


def step_scalars(beta: float, t: int) -> StepScalars:
    bt = beta**t
    c = 1.0 - bt
    rho = (1.0 - beta) * (1.0 + bt) / ((1.0 + beta) * c)
    # t == 1 (0/0 in exact arithmetic) and beta == 0 (rho == 1 for every t) carry no variance
    # information: k = 0 makes var = 0, which the guard turns into eps, whatever rounding made
    # of the quotient.
    k = 0.0 if (t == 1 or rho >= 1.0) else 1.0 / (1.0 - rho)
    return StepScalars(1.0 / c, rho, k)


def state_dtype(param: Tensor) -> torch.dtype:
    """dtype of ``m`` and ``s``: float32 for 16-bit parameters, else the parameter's."""
    if param.dtype in LOW_PRECISION:
        return torch.float32
    if param.dtype == torch.complex32:
        return torch.complex64
    return param.dtype


def floor_of(eps: float, dtype: torch.dtype) -> float:
    """``eps``, or the smallest normal number where ``eps = 0`` would put 0 into a denominator."""
    return eps if eps > 0.0 else torch.finfo(dtype).tiny


def guard(x: Tensor, floor: Scalar) -> Tensor:
    """``x`` where ``0 < x < inf``, else ``floor`` (NaN included); may work in place.

    Exactly ``torch.where((x > 0) & (x < inf), x, floor)``. Eagerly on the CPU that kernel is
    not vectorised (about 15x the cost of a multiply), so a min/max test skips it in the common
    case where nothing needs replacing, and otherwise an exact arithmetic form is used:
    ``z + floor * (1 - sign(z))`` with ``z = max(nan_to_num(x, -1), 0)``, which adds exactly 0
    to every valid entry and turns every invalid one into ``floor``.
    """
    if torch.compiler.is_compiling() or x.device.type != "cpu" or isinstance(floor, Tensor):
        return torch.where((x > 0) & (x < math.inf), x, floor)
    if x.numel() == 0:
        return x
    lo, hi = torch.aminmax(x)
    if lo.item() > 0.0 and hi.item() < math.inf:  # NaN fails both
        return x
    z = x.nan_to_num_(nan=-1.0, posinf=-1.0, neginf=-1.0).clamp_min_(0.0)
    w = torch.sign(z).neg_().add_(1.0)
    return z.add_(w, alpha=floor)


# Cephes' single-precision tanh (S. L. Moshier, Cephes Math Library): an odd polynomial below
# 0.625, 1 - 2 / (exp(2x) + 1) above; within two float32 ulps of torch.tanh on [0, inf).
_TANH_SPLIT = 0.625
_TANH_POLY = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1)


def tanh_nonnegative(x: Tensor) -> Tensor:
    """``tanh`` of a non-negative tensor, for the compiled kernel.

    Inductor's CPU code calls Sleef's tanh, about 3x slower here than this form compiled and 5x
    slower than eager ``torch.tanh`` (``benchmarks/compiled_tanh.py``); ``exp`` and a polynomial
    vectorise inline. Float64 keeps ``torch.tanh``: the polynomial is single-precision.
    """
    if x.dtype == torch.float64:
        return torch.tanh(x)
    x2 = x * x
    poly = _TANH_POLY[0]
    for c in _TANH_POLY[1:]:
        poly = poly * x2 + c
    small = x + x * x2 * poly
    large = 1 - 2 / (torch.exp(2 * x) + 1)
    return torch.where(x < _TANH_SPLIT, small, large)


def _tanh(x: Tensor) -> Tensor:
    return tanh_nonnegative(x) if torch.compiler.is_compiling() else torch.tanh(x)


# In float32, torch.tanh(x) is exactly 1 for every x >= 9.0108404 (checked for every float32 in
# [9, 10], vectorised and scalar code), so lam is exactly 1 wherever var <= 0.11 (1/var >= 9.09).
_LAM_IS_ONE_UP_TO_VAR = 0.11


def confidence(var: Tensor, *, capped: bool) -> Tensor | None:
    """``lam = tanh(min(1/var, 10))`` (``capped``) or ``tanh(1/var)``; None when it is exactly 1
    on all of ``var``.

    The shortcut is taken eagerly for float32 CPU tensors, decided by one reduction: ``tanh`` is
    the dearest operation of the step (about 40 multiplies' worth here) and ``lam`` is 1 on most
    coordinates in practice (wherever ``var < 0.11``). Skipping it changes no value.
    """
    if (
        not torch.compiler.is_compiling()
        and var.dtype == torch.float32
        and var.device.type == "cpu"
        and var.numel() > 0
        and var.amax().item() <= _LAM_IS_ONE_UP_TO_VAR  # NaN fails
    ):
        return None
    x = torch.reciprocal(var)
    return _tanh(torch.clamp(x, max=INV_VAR_CAP) if capped else x)


def _addcmul(x: Tensor, a: Tensor, b: Tensor, value: Scalar) -> Tensor:
    # ATen's CPU addcmul evaluates x + (value * a) * b; a 0-dim tensor value (compiled) cannot
    # be passed to torch.addcmul, so it is written out in the same order.
    if isinstance(value, Tensor):
        return x + value * a * b
    return torch.addcmul(x, a, b, value=value)


class Factor(NamedTuple):
    """The elementwise terms of one tensor's direction: ``d = factor * m_hat``."""

    factor: Tensor  # psi * lam (reference) or lam * m^2 / (s + eps) (algorithm1)
    lam: Tensor | None  # tanh(min(1/var, 10)) or tanh(1/var): confidence, <= 1; None: exactly 1
    gsnr: Tensor | None  # m_hat^2 / var_mean (reference) or m^2 / var (algorithm1); if asked for


def reference_factor(
    m_hat: Tensor,
    s: Tensor,
    *,
    var_scale: Scalar,
    k: Scalar,
    rho: Scalar,
    eps: Scalar,
    floor: Scalar,
    with_gsnr: bool = False,
) -> Factor:
    """``variant="reference"``: ``var = (s_hat - m_hat^2)/(1-rho)`` (guarded), ``lam``, ``psi``.

    ``var_scale = k/c``, so ``var = s*k/c - k*m_hat^2``; with ``k = 0`` (no variance estimate)
    ``var`` is 0 and the guard makes it ``eps``.
    """
    m2 = m_hat * m_hat
    var = guard(_addcmul(s * var_scale, m_hat, m_hat, -k), floor)
    lam = confidence(var, capped=True)
    var_mean = guard(var * rho, floor)
    numerator = m2 + eps
    psi = numerator / (var_mean + numerator)
    return Factor(psi if lam is None else psi * lam, lam, m2 / var_mean if with_gsnr else None)


def algorithm1_factor(m: Tensor, s: Tensor, *, floor: Scalar, with_gsnr: bool = False) -> Factor:
    """``variant="algorithm1"``: ``var = max(s - m^2, eps)``, ``lam = tanh(1/var)``."""
    m2 = m * m
    var = torch.clamp(s - m2, min=floor)
    lam = confidence(var, capped=False)
    factor = m2 / (s + floor)
    return Factor(factor if lam is None else factor * lam, lam, m2 / var if with_gsnr else None)


def preconditioner(
    m: Tensor, s: Tensor, step: int, *, beta: float = 0.95, eps: float = 1e-8, variant: str = "reference"
) -> Factor:
    """GENIE's preconditioner of one tensor from its state: ``d / m_hat`` with ``lam`` and GSNR.

    ``m``, ``s`` and ``step`` are a parameter's ``state["m"]``, ``state["s"]`` and
    ``state["step"]`` after ``step`` updates (complex state is read through its real view).
    Same operations and dtype as the eager step, so ``lam < 1`` marks exactly the coordinates
    that received noise there.
    """
    if m.is_complex():
        m, s = torch.view_as_real(m), torch.view_as_real(s)
    floor = floor_of(eps, m.dtype)
    sc = step_scalars(beta, step)
    if variant == "reference":
        got = reference_factor(
            m * sc.inv_c, s, var_scale=sc.inv_c * sc.k, k=sc.k, rho=sc.rho, eps=eps, floor=floor, with_gsnr=True
        )
    else:
        got = algorithm1_factor(m, s, floor=floor, with_gsnr=True)
    return got if got.lam is not None else got._replace(lam=torch.ones_like(got.factor))


def lam_min(lam: Tensor) -> Tensor:
    """min over the tensor; ``lam < 1`` somewhere iff ``1 - lam > 0`` somewhere (noise is due)."""
    return lam.amin() if lam.numel() else lam.new_ones(())


def noise_scale(direction: Tensor, lam: Tensor) -> float:
    """The reference variant's per-tensor noise scale ``sum(|d|) / max(sum(lam), tiny)`` with
    ``d = lam * psi * m_hat`` (one host read)."""
    num, den = torch.stack([torch.linalg.vector_norm(direction, 1), torch.linalg.vector_norm(lam, 1)]).tolist()
    return num / max(den, torch.finfo(lam.dtype).tiny)


def prepare_grad(theta: Tensor, grad: Tensor, hp: Hyperparameters) -> Tensor:
    """The gradient the moments see: cast to ``theta``'s dtype, negated for ``maximize``, plus L2
    weight decay; never modifies ``grad``."""
    g = grad if grad.dtype == theta.dtype else grad.to(theta.dtype)
    if hp.maximize:
        g = torch.neg(g)
    if hp.weight_decay != 0.0 and not hp.decoupled_weight_decay:
        g = torch.add(g, theta, alpha=hp.weight_decay)
    return g
