"""GENIE's compiled update path: one ``torch.compile``d (inductor) loop per parameter group.

The elementwise chain of :mod:`.formulas`, the moment updates and the mask are fused into one
loop per tensor (C++ on the CPU, Triton on CUDA). Hyper-parameters and step scalars enter the
kernel as tensors, so learning-rate schedules do not recompile. The mask cannot come from a
per-coordinate draw of the optimizer's generator inside a compiled loop, so coordinate ``j``
is kept when a 24-bit hash of ``(j, key)`` (:func:`hash_bits`) is at least ``round(p * 2**24)``, with one 64-bit
``key`` per tensor and step drawn from the optimizer's generator (so replicas agree and the
state round-trips); kept coordinates are rescaled by ``2**24 / (2**24 - round(p * 2**24))``,
which keeps the update unbiased. Noise is added after the loop, only to the tensors where
``1 - lam`` is non-zero, with normal draws from the same generator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from genie_dg.errors import UserInputError
from genie_dg.optim.genie.formulas import (
    Hyperparameters,
    algorithm1_factor,
    floor_of,
    noise_scale,
    preconditioner,
    reference_factor,
    step_scalars,
)

MASK_BITS = 24
_M16 = 0xFFFF
# Odd multipliers below 2**15: a 16-bit value times one is below 2**31, so the hash runs in int32
# without overflow (undefined in the C++ inductor generates for scalar code). int32 multiplies
# vectorise natively on AVX2 and AVX-512 alike; int64 ones are emulated lane by lane on AVX2.
_FEISTEL_MULTIPLIERS = (0x6A09, 0x3C6F, 0x5851, 0x2F1B)
_compiled_kernel: Callable[..., Tensor] | None = None


def mask_threshold(p: float) -> int:
    """Coordinates whose 24-bit hash is below this are dropped (probability ~ p); at most
    2**24 - 1, so a p within 2**-25 of 1 still keeps a coordinate now and then."""
    return min(round(p * (1 << MASK_BITS)), (1 << MASK_BITS) - 1)


def hash_bits(index: Tensor, key: Tensor) -> Tensor:
    """24-bit hash of ``(index, key)`` in ``[0, 2**24)``, in ``index``'s integer dtype.

    A keyed four-round Feistel network on the two 16-bit halves of ``index mod 2**32`` (a
    bijection of 32-bit values for each 64-bit ``key``): the halves are first xored with two
    16-bit parts of the key, then each round computes ``t = (right xor k_r) * a_r`` and
    ``left xor ((t xor (t >> 15)) & 0xFFFF)`` with ``k_r`` the key's four 16-bit parts and
    ``a_r`` odd 15-bit multipliers; the top 24 of the 32 output bits are kept.
    """
    parts = [((key >> (16 * r)) & _M16).to(index.dtype) for r in range(4)]
    lo = (index & _M16) ^ parts[2]
    hi = ((index >> 16) & _M16) ^ parts[3]
    for part, multiplier in zip(parts, _FEISTEL_MULTIPLIERS):
        t = (hi ^ part) * multiplier
        lo, hi = hi, lo ^ ((t ^ (t >> 15)) & _M16)
    return (hi << 8) | (lo >> 8)


def compiled_mask(param: Tensor, key: Tensor, threshold: Tensor | int) -> Tensor:
    """The compiled path's keep-mask of one tensor (bool, shape of ``param``)."""
    dtype = torch.int32 if param.numel() < 2**31 else torch.int64
    index = torch.arange(param.numel(), dtype=dtype, device=param.device).view(param.shape)
    return hash_bits(index, key) >= threshold


def _fused_kernel(
    thetas: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    per_tensor: Tensor,
    keys: Tensor,
    per_group: Tensor,
    threshold: Tensor,
    *,
    variant: str,
    preconditioning: bool,
    noise: bool,
    use_mask: bool,
    maximize: bool,
    weight_decay: str,
) -> Tensor:
    """Fused GENIE update without noise; returns min(lam) per tensor.

    ``per_tensor[i] = (1/c, k/c, k, rho)`` (:func:`.formulas.step_scalars`);
    ``per_group = (lr, beta, wd, eps, floor, scale)`` with ``scale`` the step multiplier of kept
    coordinates. Static switches are keyword arguments (dynamo specialises on them).
    """
    lr, beta, wd, eps, floor, scale = per_group.unbind()
    lam_mins = []
    for i, (param, grad, m, s) in enumerate(zip(thetas, grads, ms, ss)):
        inv_c, var_scale, k, rho = per_tensor[i].unbind()
        theta = param.to(m.dtype)
        g = grad.to(m.dtype)
        if maximize:
            g = -g
        if weight_decay == "l2":
            g = g + wd * theta
        elif weight_decay == "decoupled":
            theta = theta * (1 - lr * wd)
        m.lerp_(g, 1 - beta)
        s.mul_(beta).addcmul_(g, g, value=1 - beta)
        lam = None
        base = m * inv_c
        d = base
        if variant == "reference" and (preconditioning or noise):
            factor, lam, _ = reference_factor(base, s, var_scale=var_scale, k=k, rho=rho, eps=eps, floor=floor)
        elif preconditioning or noise:
            factor, lam, _ = algorithm1_factor(m, s, floor=floor)
        if preconditioning:
            d = base * factor
        if use_mask:
            step = torch.where(compiled_mask(param, keys[i], threshold), d * scale, 0.0)
        else:
            step = d * lr
        param.copy_(theta - step)
        lam_mins.append(lam.amin() if (noise and lam is not None) else torch.ones((), dtype=m.dtype, device=m.device))
    return torch.stack(lam_mins)


def _kernel() -> Callable[..., Tensor]:
    global _compiled_kernel
    if _compiled_kernel is None:
        _compiled_kernel = torch.compile(_fused_kernel, fullgraph=True, dynamic=False)
    return _compiled_kernel


def compiled_genie(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    *,
    generator_for: Callable[[torch.device], torch.Generator],
    hp: Hyperparameters,
) -> None:
    """GENIE's update as compiled kernels (one per state dtype), in place."""
    devices = {q.device for q in params}
    if len(devices) != 1:
        raise RuntimeError("GENIE(compiled=True) needs every parameter of a group on one device")
    # One kernel per state dtype: its scalars (eps's floor above all) are in that dtype.
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, m in enumerate(ms):
        by_dtype.setdefault(m.dtype, []).append(i)
    for idx in by_dtype.values():
        _compiled_same_dtype(
            *([x[i] for i in idx] for x in (params, grads, ms, ss, steps)),
            device=next(iter(devices)),
            generator_for=generator_for,
            hp=hp,
        )


def _undo_step_start(steps: list[Tensor], gen: torch.Generator | None, gen_state: Tensor | None) -> None:
    torch._foreach_add_(steps, -1.0)
    if gen is not None:
        gen.set_state(gen_state)


def _run_kernel(args: tuple, static: dict, steps: list[Tensor], gen, gen_state) -> Tensor:
    """Call the compiled kernel; a compilation failure undoes the step count and the draws (the
    kernel writes nothing before it runs), so a retry with ``compiled=False`` draws the same."""
    try:
        return _kernel()(*args, **static)
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        _undo_step_start(steps, gen, gen_state)
        raise UserInputError(
            "GENIE(compiled=True) needs one compiled graph per set of tensors in a group (parameters "
            "without a gradient this step count too) and dynamo's limit is reached; raise "
            "torch._dynamo.config.recompile_limit, or set optimizer.compiled=false"
        ) from err
    except torch._dynamo.exc.BackendCompilerFailed as err:
        _undo_step_start(steps, gen, gen_state)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(
            f"GENIE(compiled=True) could not compile its kernel ({reason}); install a C++ compiler "
            "(e.g. g++) for inductor, or set optimizer.compiled=false"
        ) from err


def _compiled_same_dtype(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    *,
    device: torch.device,
    generator_for: Callable[[torch.device], torch.Generator],
    hp: Hyperparameters,
) -> None:
    torch._foreach_add_(steps, 1.0)
    live = [i for i, q in enumerate(params) if q.numel() > 0]
    if not live:
        return
    params, grads, ms, ss = ([x[i] for i in live] for x in (params, grads, ms, ss))
    sdtype = ms[0].dtype
    rows = []
    for i in live:
        sc = step_scalars(hp.beta, int(steps[i].item()))
        rows.append((sc.inv_c, sc.inv_c * sc.k, sc.k, sc.rho))
    per_tensor = torch.tensor(rows, dtype=sdtype, device=device)
    threshold = mask_threshold(hp.p)
    use_mask = hp.mask and threshold > 0
    scale = hp.lr * (1 << MASK_BITS) / ((1 << MASK_BITS) - threshold) if use_mask else hp.lr
    floor = floor_of(hp.eps, sdtype)
    per_group = torch.tensor((hp.lr, hp.beta, hp.weight_decay, hp.eps, floor, scale), dtype=sdtype, device=device)
    gen = generator_for(device) if use_mask or hp.noise else None
    gen_state = gen.get_state() if gen is not None else None
    if use_mask:
        keys = torch.randint(-(1 << 63), (1 << 63) - 1, (len(params),), generator=gen, dtype=torch.int64, device=device)
    else:
        keys = torch.zeros(len(params), dtype=torch.int64, device=device)
    wd_mode = "none" if hp.weight_decay == 0.0 else ("decoupled" if hp.decoupled_weight_decay else "l2")
    threshold_t = torch.tensor(threshold, dtype=torch.int32, device=device)  # the hash's dtype
    static = dict(
        variant=hp.variant,
        preconditioning=hp.preconditioning,
        noise=hp.noise,
        use_mask=use_mask,
        maximize=hp.maximize,
        weight_decay=wd_mode,
    )
    args = (params, grads, ms, ss, per_tensor, keys, per_group, threshold_t)
    lam_min = _run_kernel(args, static, steps, gen, gen_state)
    if not hp.noise:
        return
    for j, low in enumerate(lam_min.tolist()):
        if low < 1.0:
            t = int(steps[live[j]].item())
            _add_noise(params[j], ms[j], ss[j], t, keys[j], threshold_t, scale, use_mask, gen, hp)


def _add_noise(param, m, s, t: int, key, threshold, scale: float, use_mask: bool, gen, hp: Hyperparameters) -> None:
    """The noise of a (rare) tensor whose statistics are unreliable, from the moments the kernel
    just wrote, masked with the kernel's mask."""
    factor, lam, _ = preconditioner(m, s, t, beta=hp.beta, eps=hp.eps, variant=hp.variant)
    if hp.variant == "reference":
        amplitude = noise_scale(factor.mul_(m * step_scalars(hp.beta, t).inv_c), lam)
    else:
        amplitude = hp.noise_std
    xi = torch.randn(param.shape, generator=gen, dtype=m.dtype, device=m.device)
    term = torch.rsub(lam, 1.0).mul_(xi).mul_(amplitude)
    if use_mask:
        term.mul_(compiled_mask(param, key, threshold))
    param.copy_(param.to(m.dtype).sub_(term, alpha=scale))
