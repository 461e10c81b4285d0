"""GENIE's eager update paths: one tensor at a time, and multi-tensor (``torch._foreach_*``).

Both apply the elementwise operations of :mod:`.formulas` in the same order, so their results
are bitwise identical (tested); they differ in how memory is walked. The per-tensor path runs
the formulas on slices of at most ``CPU_CHUNK_NUMEL`` elements on the CPU, so a slice and its
temporaries stay in the core's cache through the twenty-odd elementwise operations; the
multi-tensor path runs them over buckets of consecutive tensors, which on an accelerator saves
kernel launches. Random draws are made per parameter in parameter order, the normal draw (only
where ``1 - lam`` is non-zero somewhere in the tensor) before the uniform one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from genie_dg.optim.genie.formulas import (
    INV_VAR_CAP,
    LOW_PRECISION,
    Hyperparameters,
    StepScalars,
    algorithm1_factor,
    floor_of,
    guard,
    lam_min,
    noise_scale,
    prepare_grad,
    reference_factor,
    step_scalars,
)

GeneratorFor = Callable[[torch.device], torch.Generator]
# Elements per slice (per-tensor path, CPU) and per bucket (multi-tensor path).
CPU_CHUNK_NUMEL = 1 << 16
_CPU_BUCKET_NUMEL = 1 << 18
_ACCEL_BUCKET_NUMEL = 1 << 26


class Direction(NamedTuple):
    """One tensor's update before noise and mask, and what its noise needs."""

    d: Tensor
    lam: Tensor | None  # None when noise is off or lam is exactly 1 everywhere
    pre: Tensor | None  # factor * m_hat, the noise scale's numerator (None when noise is off)


def _direction(m: Tensor, s: Tensor, g: Tensor, sc: StepScalars, floor: float, hp: Hyperparameters) -> Direction:
    """Update ``m`` and ``s`` in place with ``g`` and return the direction of this step."""
    m.lerp_(g, 1.0 - hp.beta)
    s.mul_(hp.beta)
    s.addcmul_(g, g, value=1.0 - hp.beta)
    if not (hp.preconditioning or hp.noise):
        return Direction(m.mul(sc.inv_c), None, None)
    if hp.variant == "reference":
        base = m.mul(sc.inv_c)
        factor, lam, _ = reference_factor(
            base, s, var_scale=sc.inv_c * sc.k, k=sc.k, rho=sc.rho, eps=hp.eps, floor=floor
        )
        pre = factor.mul_(base) if (hp.preconditioning or hp.noise) else None
    else:
        factor, lam, _ = algorithm1_factor(m, s, floor=floor)
        base = m.mul(sc.inv_c)
        pre = base.mul(factor) if hp.preconditioning else None
    d = pre if hp.preconditioning else base
    return Direction(d, lam if hp.noise else None, pre if hp.noise else None)


def _direction_in_slices(m: Tensor, s: Tensor, g: Tensor, sc: StepScalars, floor: float, hp: Hyperparameters):
    """:func:`_direction` of a large CPU tensor, computed slice by slice into full-size results."""
    flat = [x.view(-1) for x in (m, s, g)]
    d = torch.empty_like(m)
    lam = None  # made when a slice has lam < 1 somewhere; lam is exactly 1 where None
    pre = torch.empty_like(m) if hp.noise and not hp.preconditioning and hp.variant == "reference" else None
    for start in range(0, m.numel(), CPU_CHUNK_NUMEL):
        part = slice(start, start + CPU_CHUNK_NUMEL)
        got = _direction(*(x[part] for x in flat), sc, floor, hp)
        d.view(-1)[part].copy_(got.d)
        if got.lam is not None:
            lam = torch.ones_like(m) if lam is None else lam
            lam.view(-1)[part].copy_(got.lam)
        if pre is not None:
            pre.view(-1)[part].copy_(got.pre)
    return Direction(d, lam, d if (hp.noise and hp.preconditioning) else pre)


def _sliceable(param: Tensor, *tensors: Tensor) -> bool:
    return param.device.type == "cpu" and param.numel() > CPU_CHUNK_NUMEL and all(x.is_contiguous() for x in tensors)


def _noise_amplitude(direction: Direction, hp: Hyperparameters) -> float | None:
    """The noise amplitude of a tensor, or None when ``1 - lam`` is zero on all of it."""
    if direction.lam is None or lam_min(direction.lam).item() >= 1.0:
        return None
    return noise_scale(direction.pre, direction.lam) if hp.variant == "reference" else hp.noise_std


def single_tensor_genie(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    *,
    generator_for: GeneratorFor,
    hp: Hyperparameters,
) -> None:
    """GENIE's update of each tensor in turn (in place: parameters, moments, step counts)."""
    for param, grad, m, s, step_t in zip(params, grads, ms, ss, steps):
        lowp = param.dtype in LOW_PRECISION
        theta = param.float() if lowp else param
        g = prepare_grad(theta, grad, hp)
        if hp.weight_decay != 0.0 and hp.decoupled_weight_decay:
            theta.mul_(1.0 - hp.lr * hp.weight_decay)
        step_t += 1
        sc = step_scalars(hp.beta, int(step_t.item()))
        floor = floor_of(hp.eps, theta.dtype)
        sliced = _sliceable(param, theta, m, s, g)
        if sliced:
            direction = _direction_in_slices(m, s, g, sc, floor, hp)
        else:
            direction = _direction(m, s, g, sc, floor, hp)
        del g
        amplitude = _noise_amplitude(direction, hp)
        d = direction.d
        if amplitude is not None or hp.use_mask:
            gen = generator_for(param.device)
            if amplitude is not None:
                xi = torch.randn(param.shape, generator=gen, dtype=theta.dtype, device=param.device)
                d.addcmul_(torch.rsub(direction.lam, 1.0), xi, value=amplitude)
            if hp.use_mask:
                u = torch.rand(param.shape, generator=gen, dtype=theta.dtype, device=param.device)
        if hp.use_mask:
            _apply_masked(theta, d, u, hp, sliced)
        else:
            theta.add_(d, alpha=-hp.lr)
        if lowp:
            param.copy_(theta)


def _apply_masked(theta: Tensor, d: Tensor, u: Tensor, hp: Hyperparameters, sliced: bool) -> None:
    """``theta -= lr * d * 1[u > p] / (1 - p)``; slice by slice for a sliced tensor, so each
    slice of ``u`` is read from the cache the second time."""
    value = -hp.lr / (1.0 - hp.p)
    if not sliced:
        theta.addcmul_(d, u.gt_(hp.p), value=value)
        return
    flat = [x.view(-1) for x in (theta, d, u)]
    for start in range(0, theta.numel(), CPU_CHUNK_NUMEL):
        th, dd, uu = (x[start : start + CPU_CHUNK_NUMEL] for x in flat)
        th.addcmul_(dd, uu.gt_(hp.p), value=value)


def multi_tensor_genie(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    *,
    generator_for: GeneratorFor,
    hp: Hyperparameters,
) -> None:
    """GENIE's update with ``torch._foreach_*`` over buckets of consecutive tensors.

    Buckets bound the temporaries (about six tensors' worth per element); on the CPU a bucket
    that fits the cache is also faster than one pass per operation over the whole model.
    Buckets keep parameter order, so the draws stay in parameter order.
    """
    limit = _bucket_numel(params[0].device) if params else 0
    start, size = 0, 0
    for i, q in enumerate(params):
        size += q.numel()
        if size >= limit or i == len(params) - 1:
            part = slice(start, i + 1)
            _multi_tensor_bucket(
                params[part], grads[part], ms[part], ss[part], steps[part], generator_for=generator_for, hp=hp
            )
            start, size = i + 1, 0


def _bucket_numel(device: torch.device) -> int:
    return _CPU_BUCKET_NUMEL if device.type == "cpu" else _ACCEL_BUCKET_NUMEL


def _foreach_directions(
    ms: list[Tensor],
    ss: list[Tensor],
    gs: list[Tensor],
    scal: list[StepScalars],
    floors: list[float],
    hp: Hyperparameters,
) -> tuple[list[Tensor], list[Tensor] | None, list[Tensor] | None]:
    """:func:`_direction` of every tensor of a bucket, operation by operation (same order)."""
    torch._foreach_lerp_(ms, gs, 1.0 - hp.beta)
    torch._foreach_mul_(ss, hp.beta)
    torch._foreach_addcmul_(ss, gs, gs, value=1.0 - hp.beta)
    inv_c = [sc.inv_c for sc in scal]
    if not (hp.preconditioning or hp.noise):
        return torch._foreach_mul(ms, inv_c), None, None
    if hp.variant == "reference":
        base = torch._foreach_mul(ms, inv_c)
        m2 = torch._foreach_mul(base, base)
        var = torch._foreach_mul(ss, [sc.inv_c * sc.k for sc in scal])
        torch._foreach_addcmul_(var, base, base, [-sc.k for sc in scal])
        var = [guard(v, f) for v, f in zip(var, floors)]
        lam = torch._foreach_reciprocal(var)
        torch._foreach_clamp_max_(lam, INV_VAR_CAP)
        torch._foreach_tanh_(lam)
        torch._foreach_mul_(var, [sc.rho for sc in scal])
        var_mean = [guard(v, f) for v, f in zip(var, floors)]
        del var
        factor = torch._foreach_add_(m2, hp.eps) or m2  # m2 + eps, becomes psi, then psi * lam
        torch._foreach_add_(var_mean, factor)
        torch._foreach_div_(factor, var_mean)
        torch._foreach_mul_(factor, lam)
        torch._foreach_mul_(factor, base)
        pre = factor
    else:
        m2 = torch._foreach_mul(ms, ms)
        var = torch._foreach_sub(ss, m2)
        torch._foreach_clamp_min_(var, floors)
        lam = torch._foreach_reciprocal(var)
        torch._foreach_tanh_(lam)
        base = torch._foreach_mul(ms, inv_c)
        pre = None
        if hp.preconditioning:
            torch._foreach_div_(m2, torch._foreach_add(ss, floors))
            torch._foreach_mul_(m2, lam)
            pre = torch._foreach_mul(base, m2)
    d = pre if hp.preconditioning else base
    return d, (lam if hp.noise else None), (pre if hp.noise else None)


def _multi_tensor_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    *,
    generator_for: GeneratorFor,
    hp: Hyperparameters,
) -> None:
    lowp = [q.dtype in LOW_PRECISION for q in params]
    thetas = [q.float() if lo else q for q, lo in zip(params, lowp)]
    gs = [prepare_grad(th, g, hp) for th, g in zip(thetas, grads)]
    if hp.weight_decay != 0.0 and hp.decoupled_weight_decay:
        torch._foreach_mul_(thetas, 1.0 - hp.lr * hp.weight_decay)
    torch._foreach_add_(steps, 1.0)
    scal = [step_scalars(hp.beta, int(x.item())) for x in steps]
    floors = [floor_of(hp.eps, th.dtype) for th in thetas]
    d, lam, pre = _foreach_directions(ms, ss, gs, scal, floors, hp)
    del gs
    amplitudes = _foreach_noise_amplitudes(len(params), lam, pre, hp)
    _foreach_noise_and_mask(params, thetas, d, lam, amplitudes, generator_for, hp)
    low = [i for i, lo in enumerate(lowp) if lo]
    if low:
        torch._foreach_copy_([params[i] for i in low], [thetas[i] for i in low])


def _foreach_noise_amplitudes(
    n: int, lam: list[Tensor] | None, pre: list[Tensor] | None, hp: Hyperparameters
) -> list[float | None]:
    """:func:`_noise_amplitude` of every tensor of a bucket, with two host reads."""
    if lam is None:
        return [None] * n
    lows = torch.stack([lam_min(x) for x in lam]).tolist()
    sel = [i for i, low in enumerate(lows) if low < 1.0]
    out: list[float | None] = [None] * len(lam)
    if not sel:
        return out
    if hp.variant != "reference":
        for i in sel:
            out[i] = hp.noise_std
        return out
    nums = torch._foreach_norm([pre[i] for i in sel], 1)
    dens = torch._foreach_norm([lam[i] for i in sel], 1)
    stats = torch.stack([torch.stack(nums), torch.stack(dens)]).tolist()
    for j, i in enumerate(sel):
        out[i] = stats[0][j] / max(stats[1][j], torch.finfo(lam[i].dtype).tiny)
    return out


def _foreach_noise_and_mask(
    params: list[Tensor],
    thetas: list[Tensor],
    d: list[Tensor],
    lam: list[Tensor] | None,
    amplitudes: list[float | None],
    generator_for: GeneratorFor,
    hp: Hyperparameters,
) -> None:
    """Add the noise, apply the mask and update ``thetas``; draws in parameter order."""
    xis: list[Tensor] = []
    us: list[Tensor] = []
    noisy = [i for i, a in enumerate(amplitudes) if a is not None]
    for i, param in enumerate(params):
        if amplitudes[i] is None and not hp.use_mask:
            continue
        gen = generator_for(param.device)
        if amplitudes[i] is not None:
            xis.append(torch.randn(param.shape, generator=gen, dtype=thetas[i].dtype, device=param.device))
        if hp.use_mask:
            us.append(torch.rand(param.shape, generator=gen, dtype=thetas[i].dtype, device=param.device))
    if noisy:
        oml = [torch.rsub(lam[i], 1.0) for i in noisy]
        torch._foreach_addcmul_([d[i] for i in noisy], oml, xis, [amplitudes[i] for i in noisy])
    del xis
    if hp.use_mask:
        for u in us:
            u.gt_(hp.p)
        torch._foreach_addcmul_(thetas, d, us, value=-hp.lr / (1.0 - hp.p))
    else:
        torch._foreach_add_(thetas, d, alpha=-hp.lr)
