"""GENIE: Generalization-ENhancing Iterative Equalizer (Cho, Kim & Kim, ICML 2025).

The update rule implemented here is the one fixed in ``shared/design/genie.md``;
see the :class:`GENIE` docstring for the formulas.
"""

from __future__ import annotations

import math
import warnings
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from genie_dg.errors import UserInputError

__all__ = ["GENIE", "genie_step", "register_timm"]

VARIANTS = ("reference", "algorithm1")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
# tanh(x) for x > ~9.01 is exactly 1 in float32; the reference clamps 1/var at 10.
_INV_VAR_CAP = 10.0
# Elements per multi-tensor bucket (see _multi_tensor_genie).
_CPU_BUCKET_NUMEL = 1 << 18
_ACCEL_BUCKET_NUMEL = 1 << 26


class GENIE(Optimizer):
    r"""GENIE optimizer (one-step generalization ratio guided preconditioning).

    For every parameter tensor with gradient ``g`` at step ``t`` (``t = 1`` on
    its first update), with ``L2`` weight decay ``g <- g + wd * theta`` applied
    first (``maximize`` negates ``g`` before that):

    **variant="reference"** (default; the authors' code, paper appendix D.3)::

        m <- beta*m + (1-beta)*g          s <- beta*s + (1-beta)*g^2
        c     = 1 - beta^t
        rho   = (1-beta)(1+beta^t) / ((1+beta)(1-beta^t))
        m_hat = m/c                       s_hat = s/c
        var   = (s_hat - m_hat^2)/(1-rho) ; var = eps where var <= 0, not
                                            finite, t == 1 or rho == 1
        lam   = tanh(min(1/var, 10))
        var_mean = rho*var                ; var_mean = eps where <= 0
        psi   = (m_hat^2 + eps)/(m_hat^2 + eps + var_mean)
        d     = m_hat * psi * lam                    (m_hat if preconditioning=False)
        noise_scale = sum(lam*|m_hat|*psi) / max(sum(lam), tiny)   (per tensor)
        noise = (1-lam) * noise_scale * xi,  xi ~ N(0, 1)
        mask  = 1[u > p] / (1-p),            u ~ U(0, 1)
        theta <- theta - lr * (d + noise) * mask

    **variant="algorithm1"** (the paper's pseudo-code)::

        m, s as above;  var = max(s - m^2, eps);  lam = tanh(1/var)
        d     = m/(1-beta^t) * lam*m^2/(s + eps)     (m/(1-beta^t) if preconditioning=False)
        noise = (1-lam) * noise_std * xi,   xi ~ N(0, 1)
        mask and update as above.

    Switches (per parameter group, like every hyper-parameter):

    * ``preconditioning=False``: ``d`` is the bias-corrected momentum.
    * ``noise=False``: no noise and no normal draw.
    * ``mask=False`` or ``p == 0``: no mask and no uniform draw (identical results).
    * all three off: SGD on the bias-corrected momentum ``m / (1 - beta^t)``.
    * ``decoupled_weight_decay=True``: ``theta <- theta*(1 - lr*wd)`` (AdamW form)
      instead of adding ``wd*theta`` to the gradient.

    Randomness comes from the optimizer's own :class:`torch.Generator` (one per
    device, created on first use, seeded with ``seed``; ``seed=None`` takes
    :func:`torch.initial_seed` at construction, so ``seed_everything`` fixes it).
    Per step the draws happen parameter by parameter in group order, the
    normal draw before the uniform one. The normal draw of a tensor is skipped
    when ``1 - lam`` is exactly zero on all of it (it would add nothing); this
    is decided by the same rule in both implementations. Generator states are
    part of :meth:`state_dict` (key ``"generator_states"``), so a resumed run
    continues bit-identically, and replicas built with the same seed draw the
    same noise and mask.

    Policy for non-finite gradients: m and s are never updated with them. By
    default the whole update of that tensor is skipped for this step (its
    parameter, m, s and step count stay unchanged),
    ``state[p]["nonfinite_skips"]`` counts the skips and a warning is issued
    once per optimizer. With ``error_if_nonfinite=True`` a :class:`ValueError`
    naming the parameter's index and shape is raised before any parameter is
    changed. Sparse gradients raise :class:`RuntimeError`.

    Precision: bfloat16/float16 parameters are updated in float32 and written
    back; their m and s are float32. float32/float64 parameters keep state in
    their own dtype. ``eps = 0`` is accepted; where the guards above would then
    put 0 into a denominator, the smallest normal number of the compute dtype
    is used instead, so exactly-zero gradients still give no NaN.

    State per parameter: ``step`` (0-dim float32 CPU tensor, as in Adam), ``m``
    and ``s``; nothing else except the skip counter when a skip happened.

    Args:
        params: parameters or parameter groups.
        lr: step size (SGD-like scale; 0.015 in the paper).
        beta: moving-average factor of m and s, ``0 <= beta < 1``.
        p: probability of dropping a coordinate from the update, ``0 <= p < 1``.
        weight_decay: L2 (or decoupled) weight decay, ``>= 0``.
        decoupled_weight_decay: use the AdamW form of weight decay.
        eps: numerical floor, ``>= 0``.
        variant: ``"reference"`` or ``"algorithm1"``.
        preconditioning, noise, mask: the ablation switches.
        noise_std: standard deviation of the noise of ``variant="algorithm1"``.
        seed: generator seed (``None``: :func:`torch.initial_seed`).
        maximize: ascend instead of descend.
        foreach: ``None`` picks the multi-tensor implementation when all
            parameters of a group that have gradients live on one device;
            ``False`` forces the per-tensor loop. Both give identical results.
        error_if_nonfinite: raise instead of skipping on non-finite gradients.
        compiled: run the update as one ``torch.compile``d (inductor) kernel per
            group instead of ``foreach``; see "Compiled step" below.

    Compiled step (``compiled=True``): the elementwise chain, the moment updates
    and the mask are fused into one loop per tensor, compiled once per group
    (the first step takes seconds to minutes; later ones run at about the
    cost of ``Adam(foreach)``, see the README). Hyper-parameters are passed to
    the kernel as tensors, so learning-rate schedules do not recompile. The
    mask cannot come from a per-coordinate draw of the CPU generator inside a
    compiled loop, so this path keeps coordinate ``j`` when
    ``h(key, j) >= round(p * 2**24)`` with ``h`` a 24-bit integer hash (one round of a
    32-bit xor-shift-multiply mixer) and
    ``key`` one 64-bit integer per tensor and step drawn from the optimizer's
    generator (so replicas still agree and the state still round-trips); kept
    coordinates are rescaled by ``2**24 / (2**24 - round(p * 2**24))``, which
    keeps the update unbiased. Noise is added after the fused loop, only to the
    tensors where ``1 - lam`` is non-zero, with normal draws from the same
    generator. Results equal the eager paths' up to rounding when the mask is
    off; with the mask on they follow the same distribution but not the same
    stream. Tested on the CPU; inductor needs a C++ compiler there.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.015,
        beta: float = 0.95,
        p: float = 0.4,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        eps: float = 1e-8,
        variant: str = "reference",
        preconditioning: bool = True,
        noise: bool = True,
        mask: bool = True,
        noise_std: float = 1e-3,
        seed: int | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        error_if_nonfinite: bool = False,
        compiled: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            beta=beta,
            p=p,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            eps=eps,
            variant=variant,
            preconditioning=preconditioning,
            noise=noise,
            mask=mask,
            noise_std=noise_std,
            maximize=maximize,
            foreach=foreach,
            error_if_nonfinite=error_if_nonfinite,
            compiled=compiled,
        )
        _validate_hparams(defaults)
        self._seed = _validate_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        # Generator states loaded before the generator of their device exists.
        self._pending_generator_states: dict[str, Tensor] = {}
        self._warned_nonfinite = False
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the merged group before torch registers it, so a bad group
        # leaves the optimizer unchanged.
        if isinstance(param_group, dict):
            _validate_hparams({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_seed", int(torch.initial_seed()))
        self.__dict__.setdefault("_generators", {})
        self.__dict__.setdefault("_pending_generator_states", {})
        self.__dict__.setdefault("_warned_nonfinite", False)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def __getstate__(self) -> dict[str, Any]:
        # torch.Generator cannot be pickled or deep-copied; carry its state.
        state = super().__getstate__()
        state["_seed"] = self._seed
        state["_pending_generator_states"] = self._generator_states()
        state["_generators"] = {}
        state["_warned_nonfinite"] = self._warned_nonfinite
        return state

    # ------------------------------------------------------------- generators
    @property
    def seed(self) -> int:
        return self._seed

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            saved = self._pending_generator_states.pop(key, None)
            if saved is None:
                # A checkpoint written by another replica (cuda:0 read on
                # cuda:1) still continues its stream when the device type is
                # unambiguous.
                same_type = [k for k in self._pending_generator_states if k.split(":")[0] == device.type]
                if len(same_type) == 1:
                    saved = self._pending_generator_states.pop(same_type[0])
            if saved is not None:
                gen.set_state(saved.to(device="cpu", dtype=torch.uint8))
            self._generators[key] = gen
        return gen

    def _generator_states(self) -> dict[str, Tensor]:
        states = {k: v.clone() for k, v in self._pending_generator_states.items()}
        states.update({k: g.get_state() for k, g in self._generators.items()})
        return states

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["generator_states"] = self._generator_states()
        sd["genie_seed"] = self._seed
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        gen_states = state_dict.pop("generator_states", None)
        seed = state_dict.pop("genie_seed", None)
        saved_state = state_dict.get("state", {})
        # How to compute (compiled, foreach) is this process's choice, not the checkpoint's.
        implementation = [(g["compiled"], g["foreach"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, (compiled, foreach) in zip(self.param_groups, implementation):
            group["compiled"], group["foreach"] = compiled, foreach
        # torch casts floating state to the parameter dtype; bf16/fp16
        # parameters keep float32 moments, so restore them at full precision.
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                saved = saved_state.get(index)
                st = self.state.get(param)
                if saved is not None and st:
                    sdtype = _state_dtype(param)
                    for key in ("m", "s"):
                        if key in saved and st[key].dtype != sdtype:
                            st[key] = saved[key].to(device=param.device, dtype=sdtype).clone()
                index += 1
        if seed is not None:
            self._seed = int(seed)
        if gen_states is not None:
            self._generators = {}
            self._pending_generator_states = {k: v.clone() for k, v in gen_states.items()}

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss; it is called
                under ``torch.enable_grad()`` and its result is returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        index = 0
        for group in self.param_groups:
            items = []
            for param in group["params"]:
                if param.grad is not None:
                    items.append((index, param))
                index += 1
            work.append(self._init_group(group, items))

        self._drop_nonfinite(work)

        for group, (params, grads, ms, ss, steps) in zip(self.param_groups, work):
            if not params:
                continue
            if group.get("compiled", False):
                _compiled_genie(params, grads, ms, ss, steps, generator_for=self._generator, **_group_hparams(group))
                continue
            use_foreach = group["foreach"]
            if use_foreach is None:
                use_foreach = len({p.device for p in params}) == 1
            genie_step(
                params,
                grads,
                ms,
                ss,
                steps,
                generator_for=self._generator,
                foreach=bool(use_foreach),
                **_group_hparams(group),
            )
        return loss

    def _init_group(self, group: dict[str, Any], items: list[tuple[int, Tensor]]):
        params, grads, ms, ss, steps, indices = [], [], [], [], [], []
        for index, param in items:
            grad = param.grad
            if grad.is_sparse:
                raise RuntimeError(
                    "GENIE does not support sparse gradients; use dense gradients "
                    "(e.g. nn.Embedding(sparse=False))"
                )
            if torch.is_complex(param):
                raise RuntimeError("GENIE does not support complex parameters")
            state = self.state[param]
            if len(state) == 0:
                # step lives on the CPU (as in non-capturable Adam) so reading
                # it never synchronises an accelerator.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                sdtype = _state_dtype(param)
                state["m"] = torch.zeros_like(param, dtype=sdtype, memory_format=torch.preserve_format)
                state["s"] = torch.zeros_like(param, dtype=sdtype, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(grad)
            ms.append(state["m"])
            ss.append(state["s"])
            steps.append(state["step"])
            indices.append(index)
        return [params, grads, ms, ss, steps, indices]

    def _drop_nonfinite(self, work: list[list]) -> None:
        """Remove tensors with non-finite gradients from this step (or raise)."""
        grads = [g for w in work for g in w[1]]
        if not grads:
            for w in work:
                del w[5]
            return
        finite = _all_finite_flags(grads)
        if all(finite):
            for w in work:
                del w[5]
            return
        k = 0
        bad = []
        for group, w in zip(self.param_groups, work):
            keep = []
            for j in range(len(w[0])):
                if finite[k]:
                    keep.append(j)
                else:
                    bad.append((group, w[5][j], w[0][j]))
                k += 1
            w[:] = [[lst[j] for j in keep] for lst in w[:5]]
        for group, index, param in bad:
            if group["error_if_nonfinite"]:
                raise ValueError(
                    f"GENIE: non-finite gradient for parameter {index} "
                    f"(shape {tuple(param.shape)}); no parameter was updated"
                )
        for group, index, param in bad:
            state = self.state[param]
            state["nonfinite_skips"] = int(state.get("nonfinite_skips", 0)) + 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            shown = ", ".join(f"{i} {tuple(p.shape)}" for _, i, p in bad[:5])
            warnings.warn(
                f"GENIE: non-finite gradients for parameter(s) {shown}; their update "
                "was skipped for this step (counted in state['nonfinite_skips']). "
                "This warning is shown once.",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def nonfinite_skips(self) -> int:
        """Total number of tensor updates skipped because of non-finite gradients."""
        return sum(int(st.get("nonfinite_skips", 0)) for st in self.state.values())

    # ------------------------------------------------------------- statistics
    @torch.no_grad()
    def statistics(self) -> list[dict[str, float]]:
        """Diagnostics per parameter group, recomputed from ``m``, ``s`` and ``step``.

        Nothing is stored by :meth:`step`; the values below are recomputed from
        the state, so they are exactly those of each tensor's last update.
        Means are over all coordinates of the group's tensors that have state.

        * ``gsnr_mean``: mean GSNR of the averaged gradient, ``m_hat^2 / var_mean``
          (reference; so ``psi = (gsnr + eps') / (gsnr + eps' + 1)``) or
          ``m^2 / var`` (algorithm1).
        * ``precond_mean``: mean preconditioner ``d / m_hat`` = ``psi * lam``
          (reference) or ``lam * m^2 / (s + eps)`` (algorithm1); 1 when
          preconditioning is off.
        * ``noise_active_fraction``: fraction of coordinates with ``1 - lam > 0``
          (0 when noise is off).
        * ``mask_fraction``: expected fraction of coordinates dropped per step
          (``p``, 0 when the mask is off); the masks themselves are not kept.
        * ``lam_mean``, ``step`` (largest step count), ``numel``, ``nonfinite_skips``.
        """
        out = []
        for group in self.param_groups:
            hp = _group_hparams(group)
            n = 0
            sums = {"gsnr": 0.0, "precond": 0.0, "active": 0.0, "lam": 0.0}
            max_step = 0
            skips = 0
            for param in group["params"]:
                st = self.state.get(param)
                if not st:
                    continue
                skips += int(st.get("nonfinite_skips", 0))
                t = int(st["step"])
                if t == 0:
                    continue
                max_step = max(max_step, t)
                gsnr, precond, lam = _stats_terms(st["m"], st["s"], t, hp)
                if not hp["preconditioning"]:
                    precond = torch.ones_like(precond)
                sums["gsnr"] += float(gsnr.sum(dtype=torch.float64))
                sums["precond"] += float(precond.sum(dtype=torch.float64))
                sums["lam"] += float(lam.sum(dtype=torch.float64))
                if hp["noise"]:
                    sums["active"] += float((lam < 1).sum())
                n += lam.numel()
            denom = max(n, 1)
            out.append(
                {
                    "gsnr_mean": sums["gsnr"] / denom,
                    "precond_mean": sums["precond"] / denom,
                    "lam_mean": sums["lam"] / denom,
                    "noise_active_fraction": sums["active"] / denom,
                    "mask_fraction": float(hp["p"]) if hp["mask"] else 0.0,
                    "step": float(max_step),
                    "numel": float(n),
                    "nonfinite_skips": float(skips),
                }
            )
        return out


# ---------------------------------------------------------------------------
# validation and small helpers
# ---------------------------------------------------------------------------
def _validate_hparams(h: dict[str, Any]) -> None:
    def bad(name: str, expected: str) -> UserInputError:
        return UserInputError(f"GENIE: invalid {name}={h[name]!r}; expected {expected}")

    def number(name: str) -> float:
        value = h[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, Tensor) and value.numel() == 1 and not value.requires_grad:
                return float(value)
            raise bad(name, "a real number")
        return float(value)

    if not number("lr") >= 0.0:
        raise bad("lr", "lr >= 0")
    if not 0.0 <= number("beta") < 1.0:
        raise bad("beta", "0 <= beta < 1")
    if not 0.0 <= number("p") < 1.0:
        raise bad("p", "0 <= p < 1")
    if not number("weight_decay") >= 0.0:
        raise bad("weight_decay", "weight_decay >= 0")
    if not number("eps") >= 0.0:
        raise bad("eps", "eps >= 0")
    if not number("noise_std") >= 0.0:
        raise bad("noise_std", "noise_std >= 0")
    for name in ("lr", "weight_decay", "eps", "noise_std"):
        if not math.isfinite(number(name)):
            raise bad(name, f"a finite {name}")
    if h["variant"] not in VARIANTS:
        raise bad("variant", "one of " + ", ".join(repr(v) for v in VARIANTS))
    if h["foreach"] not in (None, True, False):
        raise bad("foreach", "None, True or False")
    if h.get("compiled", False) not in (True, False):
        raise bad("compiled", "True or False")


def _validate_seed(seed: Any) -> int:
    if seed is None:
        return int(torch.initial_seed())
    try:
        value = operator.index(seed)
    except TypeError:
        value = -1
    if isinstance(seed, bool) or not 0 <= value < 2**64:
        raise UserInputError(f"GENIE: invalid seed={seed!r}; expected an int in [0, 2**64) or None")
    return int(value)


def _group_hparams(group: dict[str, Any]) -> dict[str, Any]:
    return dict(
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


def _state_dtype(param: Tensor) -> torch.dtype:
    return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype


def _floor(eps: float, dtype: torch.dtype) -> float:
    # eps = 0 would put 0 into a denominator (0/0 for exactly-zero gradients).
    return eps if eps > 0.0 else torch.finfo(dtype).tiny


def _all_finite_flags(grads: list[Tensor]) -> list[bool]:
    """One bool per gradient, with one host read per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    flags = [True] * len(grads)
    for device, idx in by_device.items():
        # A sum is NaN/inf when an entry is; it can also overflow for huge
        # finite entries, so suspects are confirmed with an exact test.
        if device.type == "cpu":
            sums = [grads[i].sum() for i in idx]
        else:
            sums = torch._foreach_norm([grads[i] for i in idx], 1)
        ok = torch.stack([x.float() for x in sums]).isfinite().tolist()
        for i, f in zip(idx, ok):
            flags[i] = f or bool(torch.isfinite(grads[i]).all())
    return flags


def _bias_scalars(beta: float, t: int) -> tuple[float, float, float | None]:
    """(1/c, rho, 1/(1-rho)); the last is None when no variance estimate exists."""
    bt = beta**t
    c = 1.0 - bt
    rho = (1.0 - beta) * (1.0 + bt) / ((1.0 + beta) * c)
    # t == 1 (0/0 in exact arithmetic) and beta == 0 (rho == 1 for every t)
    # carry no variance information: the spec's guard sets var = eps there,
    # whatever rounding made of the quotient.
    k = None if (t == 1 or rho >= 1.0) else 1.0 / (1.0 - rho)
    return 1.0 / c, rho, k


def _guard(x: Tensor, floor: float) -> Tensor:
    """``x`` where ``0 < x < inf``, else ``floor`` (NaN included); may work in place.

    Exactly ``torch.where((x > 0) & (x < inf), x, floor)``. On the CPU that
    kernel is not vectorised (about 15x the cost of a multiply), so a cheap
    min/max test skips it in the common case where nothing needs replacing,
    and otherwise an exact arithmetic form is used:
    ``z + floor * (1 - sign(z))`` with ``z = max(nan_to_num(x, -1), 0)``, which
    adds exactly 0 to every valid entry and turns every invalid one into floor.
    """
    if x.device.type != "cpu":
        return torch.where((x > 0) & (x < math.inf), x, floor)
    if x.numel() == 0:
        return x
    lo, hi = torch.aminmax(x)
    if lo.item() > 0.0 and hi.item() < math.inf:  # NaN fails both
        return x
    z = x.nan_to_num_(nan=-1.0, posinf=-1.0, neginf=-1.0).clamp_min_(0.0)
    w = torch.sign(z).neg_().add_(1.0)
    return z.add_(w, alpha=floor)


def _lam_min(lam: Tensor) -> Tensor:
    # min over the tensor; lam < 1 somewhere <=> (1 - lam) > 0 somewhere.
    return lam.amin() if lam.numel() else lam.new_ones(())


def _noise_scale(direction: Tensor, lam: Tensor) -> float:
    """The reference variant's per-tensor noise scale ``sum(|d|) / max(sum(lam), tiny)`` with
    ``d = lam * psi * m_hat`` (one host read)."""
    num, den = torch.stack([torch.linalg.vector_norm(direction, 1), torch.linalg.vector_norm(lam, 1)]).tolist()
    return num / max(den, torch.finfo(lam.dtype).tiny)


def _prepare_grad(theta: Tensor, grad: Tensor, *, maximize: bool, weight_decay: float, decoupled: bool) -> Tensor:
    g = grad if grad.dtype == theta.dtype else grad.to(theta.dtype)
    if maximize:
        g = torch.neg(g)
    if weight_decay != 0.0 and not decoupled:
        g = torch.add(g, theta, alpha=weight_decay)
    return g


# ---------------------------------------------------------------------------
# the update, one tensor at a time
# ---------------------------------------------------------------------------
# Both implementations apply the same elementwise operations in the same
# order (the multi-tensor one through torch._foreach_*), so their results are
# bitwise identical; the formulas are reordered from the docstring only to
# save passes over memory (e.g. (s_hat - m_hat^2)/(1-rho) is computed as
# s*(k/c) - k*m_hat^2 with k = 1/(1-rho)).
def _single_tensor_genie(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    *,
    generator_for: Callable[[torch.device], torch.Generator],
    lr: float,
    beta: float,
    p: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    eps: float,
    variant: str,
    preconditioning: bool,
    noise: bool,
    mask: bool,
    noise_std: float,
    maximize: bool,
) -> None:
    use_mask = mask and p > 0.0
    for param, grad, m, s, step_t in zip(params, grads, ms, ss, steps):
        lowp = param.dtype in _LOW_PRECISION
        theta = param.float() if lowp else param
        g = _prepare_grad(theta, grad, maximize=maximize, weight_decay=weight_decay, decoupled=decoupled_weight_decay)
        if weight_decay != 0.0 and decoupled_weight_decay:
            theta.mul_(1.0 - lr * weight_decay)
        step_t += 1
        t = int(step_t.item())
        inv_c, rho, k = _bias_scalars(beta, t)
        floor = _floor(eps, theta.dtype)

        m.lerp_(g, 1.0 - beta)
        s.mul_(beta)
        s.addcmul_(g, g, value=1.0 - beta)
        del g

        oml = None  # 1 - lam, only where a normal draw is made
        noise_value = 0.0
        if not (preconditioning or noise):
            d = m.mul(inv_c)
        elif variant == "reference":
            mh = m.mul(inv_c)
            m2 = mh.mul(mh)
            if k is None:
                var = torch.full_like(m, floor)
            else:
                var = s.mul(inv_c * k)
                var.addcmul_(mh, mh, value=-k)
                var = _guard(var, floor)
            lam = torch.reciprocal(var)
            lam.clamp_max_(_INV_VAR_CAP)
            lam.tanh_()
            var_mean = _guard(var.mul_(rho), floor)
            del var
            pl = m2.add_(eps)  # becomes psi, then psi * lam
            var_mean.add_(pl)
            pl.div_(var_mean)
            del var_mean
            pl.mul_(lam)
            pre = None
            if preconditioning:
                d = pre = pl.mul_(mh)
            else:
                d = mh
            if noise and _lam_min(lam).item() < 1.0:
                if pre is None:
                    pre = pl.mul_(mh)
                noise_value = _noise_scale(pre, lam)
                oml = torch.rsub(lam, 1.0)
        else:
            m2 = m.mul(m)
            lam = s.sub(m2)
            lam.clamp_min_(floor)
            lam.reciprocal_()
            lam.tanh_()
            d = m.mul(inv_c)
            if preconditioning:
                m2.div_(s.add(floor))
                m2.mul_(lam)
                d.mul_(m2)
            if noise and _lam_min(lam).item() < 1.0:
                noise_value = noise_std
                oml = torch.rsub(lam, 1.0)

        if oml is not None or use_mask:
            gen = generator_for(param.device)
            if oml is not None:
                xi = torch.randn(param.shape, generator=gen, dtype=theta.dtype, device=param.device)
                d.addcmul_(oml, xi, value=noise_value)
            if use_mask:
                u = torch.rand(param.shape, generator=gen, dtype=theta.dtype, device=param.device)
                u.gt_(p)
        if use_mask:
            theta.addcmul_(d, u, value=-lr / (1.0 - p))
        else:
            theta.add_(d, alpha=-lr)
        if lowp:
            param.copy_(theta)


# ---------------------------------------------------------------------------
# the update, multi-tensor (torch._foreach_*)
# ---------------------------------------------------------------------------
def _multi_tensor_genie(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    **kwargs: Any,
) -> None:
    # Buckets of consecutive tensors bound the temporaries (about six tensors'
    # worth per element); on the CPU a bucket that fits the cache is also
    # faster than one pass per operation over the whole model. Buckets keep
    # parameter order, so the draws stay in parameter order.
    limit = _bucket_numel(params[0].device) if params else 0
    start, size = 0, 0
    for i, q in enumerate(params):
        size += q.numel()
        if size >= limit or i == len(params) - 1:
            sl = slice(start, i + 1)
            _multi_tensor_bucket(params[sl], grads[sl], ms[sl], ss[sl], steps[sl], **kwargs)
            start, size = i + 1, 0


def _bucket_numel(device: torch.device) -> int:
    return _CPU_BUCKET_NUMEL if device.type == "cpu" else _ACCEL_BUCKET_NUMEL


def _multi_tensor_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    *,
    generator_for: Callable[[torch.device], torch.Generator],
    lr: float,
    beta: float,
    p: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    eps: float,
    variant: str,
    preconditioning: bool,
    noise: bool,
    mask: bool,
    noise_std: float,
    maximize: bool,
) -> None:
    n = len(params)
    use_mask = mask and p > 0.0
    lowp = [q.dtype in _LOW_PRECISION for q in params]
    thetas = [q.float() if lo else q for q, lo in zip(params, lowp)]

    gs = [g if g.dtype == th.dtype else g.to(th.dtype) for g, th in zip(grads, thetas)]
    if maximize:
        gs = torch._foreach_neg(gs)
    if weight_decay != 0.0:
        if decoupled_weight_decay:
            torch._foreach_mul_(thetas, 1.0 - lr * weight_decay)
        else:
            gs = torch._foreach_add(gs, thetas, alpha=weight_decay)

    torch._foreach_add_(steps, 1.0)
    scal = [_bias_scalars(beta, int(x.item())) for x in steps]
    inv_c = [sc[0] for sc in scal]
    floors = [_floor(eps, th.dtype) for th in thetas]

    torch._foreach_lerp_(ms, gs, 1.0 - beta)
    torch._foreach_mul_(ss, beta)
    torch._foreach_addcmul_(ss, gs, gs, value=1.0 - beta)
    del gs

    oml: list[Tensor | None] = [None] * n
    noise_values = [0.0] * n
    if not (preconditioning or noise):
        d = torch._foreach_mul(ms, inv_c)
    elif variant == "reference":
        mh = torch._foreach_mul(ms, inv_c)
        m2 = torch._foreach_mul(mh, mh)
        var = torch._foreach_mul(ss, [ic * sc[2] if sc[2] is not None else 0.0 for ic, sc in zip(inv_c, scal)])
        torch._foreach_addcmul_(var, mh, mh, [-sc[2] if sc[2] is not None else 0.0 for sc in scal])
        var = [torch.full_like(v, f) if sc[2] is None else _guard(v, f) for v, f, sc in zip(var, floors, scal)]
        lam = torch._foreach_reciprocal(var)
        torch._foreach_clamp_max_(lam, _INV_VAR_CAP)
        torch._foreach_tanh_(lam)
        torch._foreach_mul_(var, [sc[1] for sc in scal])
        var_mean = [_guard(v, f) for v, f in zip(var, floors)]
        del var
        pl = torch._foreach_add_(m2, eps) or m2
        del m2
        torch._foreach_add_(var_mean, pl)
        torch._foreach_div_(pl, var_mean)
        del var_mean
        torch._foreach_mul_(pl, lam)
        if preconditioning:
            torch._foreach_mul_(pl, mh)
            d = pre = pl
        else:
            d, pre = mh, None
        if noise:
            lam_min = torch.stack([_lam_min(x) for x in lam]).tolist()
            sel = [i for i in range(n) if lam_min[i] < 1.0]
            if sel:
                if pre is None:
                    torch._foreach_mul_([pl[i] for i in sel], [mh[i] for i in sel])
                    pre = pl
                nums = torch._foreach_norm([pre[i] for i in sel], 1)
                dens = torch._foreach_norm([lam[i] for i in sel], 1)
                stats = torch.stack([torch.stack(nums), torch.stack(dens)]).tolist()
                for j, i in enumerate(sel):
                    noise_values[i] = stats[0][j] / max(stats[1][j], torch.finfo(lam[i].dtype).tiny)
                    oml[i] = torch.rsub(lam[i], 1.0)
    else:
        m2 = torch._foreach_mul(ms, ms)
        lam = torch._foreach_sub(ss, m2)
        torch._foreach_clamp_min_(lam, floors)
        torch._foreach_reciprocal_(lam)
        torch._foreach_tanh_(lam)
        d = torch._foreach_mul(ms, inv_c)
        if preconditioning:
            torch._foreach_div_(m2, torch._foreach_add(ss, floors))
            torch._foreach_mul_(m2, lam)
            torch._foreach_mul_(d, m2)
        del m2
        if noise:
            lam_min = torch.stack([_lam_min(x) for x in lam]).tolist()
            for i in range(n):
                if lam_min[i] < 1.0:
                    noise_values[i] = noise_std
                    oml[i] = torch.rsub(lam[i], 1.0)

    # Draws in parameter order, the normal before the uniform, exactly as the
    # per-tensor loop makes them.
    xis: list[Tensor] = []
    us: list[Tensor] = []
    for i, param in enumerate(params):
        if oml[i] is None and not use_mask:
            continue
        gen = generator_for(param.device)
        if oml[i] is not None:
            xis.append(torch.randn(param.shape, generator=gen, dtype=thetas[i].dtype, device=param.device))
        if use_mask:
            us.append(torch.rand(param.shape, generator=gen, dtype=thetas[i].dtype, device=param.device))
    if xis:
        sel = [i for i in range(n) if oml[i] is not None]
        torch._foreach_addcmul_([d[i] for i in sel], [oml[i] for i in sel], xis, [noise_values[i] for i in sel])
    del xis
    if use_mask:
        for u in us:
            u.gt_(p)
        torch._foreach_addcmul_(thetas, d, us, value=-lr / (1.0 - p))
    else:
        torch._foreach_add_(thetas, d, alpha=-lr)
    low = [i for i in range(n) if lowp[i]]
    if low:
        torch._foreach_copy_([params[i] for i in low], [thetas[i] for i in low])


# ---------------------------------------------------------------------------
# the update, compiled (torch.compile / inductor)
# ---------------------------------------------------------------------------
_MASK_BITS = 24
_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31: every product of a 32-bit value with one fits
# in int64, so the hash never relies on signed overflow (undefined in the C++
# inductor generates, and folded differently in vector tails).
_MIX = (0x7FEB352D, 0x1B873593)
_compiled_kernel: Callable[..., Tensor] | None = None


def _mask_threshold(p: float) -> int:
    """Coordinates whose 24-bit hash is below this are dropped (probability ~ p); at most
    2**24 - 1, so a p within 2**-25 of 1 still keeps a coordinate now and then."""
    return min(round(p * (1 << _MASK_BITS)), (1 << _MASK_BITS) - 1)


def _mix32(x: Tensor, a: int, b: int) -> Tensor:
    x = x ^ (x >> 16)
    x = (x * a) & _M32
    x = x ^ (x >> 15)
    x = (x * b) & _M32
    return x ^ (x >> 16)


def _hash_bits(index: Tensor, key: Tensor) -> Tensor:
    """24-bit hash of ``(index, key)`` as int64 in ``[0, 2**24)``.

    One round of a 32-bit xor-shift-multiply mixer (a bijection of 32-bit
    values) applied to ``(index xor key_high) + key_low`` modulo 2**32, with
    ``key_high``/``key_low`` the halves of the 64-bit key; the top 24 bits are
    kept. Indices are taken modulo 2**32. One round, not two: the int64
    multiplies are most of the mask's cost in the compiled loop.
    """
    x = (((index & _M32) ^ ((key >> 32) & _M32)) + (key & _M32)) & _M32
    return _mix32(x, _MIX[0], _MIX[1]) >> (32 - _MASK_BITS)


# Cephes' single-precision tanh (S. L. Moshier, Cephes Math Library): an odd polynomial below
# 0.625, 1 - 2 / (exp(2x) + 1) above; within two float32 ulps of torch.tanh on [0, inf).
_TANH_SPLIT = 0.625
_TANH_POLY = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1)


def _tanh_nonnegative(x: Tensor) -> Tensor:
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


def _compiled_mask(param: Tensor, key: Tensor, threshold: Tensor) -> Tensor:
    """The compiled path's keep-mask of one tensor (bool, shape of ``param``)."""
    index = torch.arange(param.numel(), dtype=torch.int64, device=param.device).view(param.shape)
    return _hash_bits(index, key) >= threshold


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

    ``per_tensor[i] = (1/c, k/c, k, rho, no_variance)``;
    ``per_group = (lr, beta, wd, eps, floor, scale)`` with ``scale`` the
    step multiplier of kept coordinates. Static switches are keyword
    arguments (dynamo specialises on them).
    """
    lr, beta, wd, eps, floor, scale = per_group.unbind()
    lam_mins = []
    for i, (param, grad, m, s) in enumerate(zip(thetas, grads, ms, ss)):
        inv_c, kc, k, rho, no_var = per_tensor[i].unbind()
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
        if not (preconditioning or noise):
            d = m * inv_c
        elif variant == "reference":
            mh = m * inv_c
            m2 = mh * mh
            var = s * kc - k * m2
            var = torch.where((var > 0) & (var < math.inf) & (no_var == 0), var, floor)
            lam = _tanh_nonnegative(torch.clamp(1 / var, max=_INV_VAR_CAP))
            var_mean = var * rho
            var_mean = torch.where((var_mean > 0) & (var_mean < math.inf), var_mean, floor)
            d = mh * ((m2 + eps) / (m2 + eps + var_mean) * lam) if preconditioning else mh
        else:
            m2 = m * m
            lam = _tanh_nonnegative(1 / torch.clamp(s - m2, min=floor))
            d = m * inv_c
            if preconditioning:
                d = d * (lam * m2 / (s + floor))
        if use_mask:
            step = torch.where(_compiled_mask(param, keys[i], threshold), d * scale, 0.0)
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


def _compiled_genie(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    *,
    generator_for: Callable[[torch.device], torch.Generator],
    **hparams: Any,
) -> None:
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
            **hparams,
        )


def _undo_step_start(steps: list[Tensor], gen: torch.Generator | None, gen_state: Tensor | None) -> None:
    torch._foreach_add_(steps, -1.0)
    if gen is not None:
        gen.set_state(gen_state)


def _compiled_same_dtype(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    *,
    device: torch.device,
    generator_for: Callable[[torch.device], torch.Generator],
    lr: float,
    beta: float,
    p: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    eps: float,
    variant: str,
    preconditioning: bool,
    noise: bool,
    mask: bool,
    noise_std: float,
    maximize: bool,
) -> None:
    torch._foreach_add_(steps, 1.0)
    live = [i for i, q in enumerate(params) if q.numel() > 0]
    if not live:
        return
    params, grads, ms, ss = ([x[i] for i in live] for x in (params, grads, ms, ss))
    sdtype = ms[0].dtype
    rows = []
    for i in live:
        inv_c, rho, k = _bias_scalars(beta, int(steps[i].item()))
        rows.append((inv_c, inv_c * (k or 0.0), k or 0.0, rho, 1.0 if k is None else 0.0))
    per_tensor = torch.tensor(rows, dtype=sdtype, device=device)
    threshold = _mask_threshold(p)
    use_mask = mask and threshold > 0
    scale = lr * (1 << _MASK_BITS) / ((1 << _MASK_BITS) - threshold) if use_mask else lr
    floor = _floor(eps, sdtype)
    per_group = torch.tensor((lr, beta, weight_decay, eps, floor, scale), dtype=sdtype, device=device)
    gen = generator_for(device) if use_mask or noise else None
    # Restored if compilation fails, so a retry (e.g. with compiled=False) draws what it would have.
    gen_state = gen.get_state() if gen is not None else None
    if use_mask:
        keys = torch.randint(-(1 << 63), (1 << 63) - 1, (len(params),), generator=gen, dtype=torch.int64, device=device)
    else:
        keys = torch.zeros(len(params), dtype=torch.int64, device=device)
    wd_mode = "none" if weight_decay == 0.0 else ("decoupled" if decoupled_weight_decay else "l2")
    try:
        lam_min = _kernel()(
            params,
            grads,
            ms,
            ss,
            per_tensor,
            keys,
            per_group,
            torch.tensor(threshold, dtype=torch.int64, device=device),
            variant=variant,
            preconditioning=preconditioning,
            noise=noise,
            use_mask=use_mask,
            maximize=maximize,
            weight_decay=wd_mode,
        )
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        _undo_step_start(steps, gen, gen_state)
        raise UserInputError(
            "GENIE(compiled=True) needs one compiled graph per set of tensors in a group (parameters "
            "without a gradient this step count too) and dynamo's limit is reached; raise "
            "torch._dynamo.config.recompile_limit, or set optimizer.compiled=false"
        ) from err
    except torch._dynamo.exc.BackendCompilerFailed as err:
        # Compilation fails before the kernel writes anything: undo the step count and draws.
        _undo_step_start(steps, gen, gen_state)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(
            f"GENIE(compiled=True) could not compile its kernel ({reason}); install a C++ compiler "
            "(e.g. g++) for inductor, or set optimizer.compiled=false"
        ) from err
    if not noise:
        return
    hp = dict(beta=beta, eps=eps, variant=variant, preconditioning=preconditioning, noise=True)
    for j, low in enumerate(lam_min.tolist()):
        if low >= 1.0:
            continue
        i = live[j]
        # The noise of the (rare) tensors whose statistics are unreliable,
        # from the moments the kernel just wrote.
        t = int(steps[i].item())
        _, precond, lam = _stats_terms(ms[j], ss[j], t, hp)
        if variant == "reference":
            amplitude = _noise_scale(precond.mul_(ms[j] * _bias_scalars(beta, t)[0]), lam)
        else:
            amplitude = noise_std
        xi = torch.randn(params[j].shape, generator=gen, dtype=sdtype, device=device)
        term = torch.rsub(lam, 1.0).mul_(xi).mul_(amplitude)
        if use_mask:
            term.mul_(_compiled_mask(params[j], keys[j], threshold))
        params[j].copy_(params[j].to(sdtype).sub_(term, alpha=scale))


def genie_step(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    *,
    generator_for: Callable[[torch.device], torch.Generator],
    foreach: bool = False,
    **hparams: Any,
) -> None:
    """Functional GENIE update of ``params``, ``ms``, ``ss`` and ``steps`` in place.

    ``generator_for(device)`` returns the generator for the draws on that
    device; ``hparams`` are the group's hyper-parameters (see :class:`GENIE`).
    """
    fn = _multi_tensor_genie if foreach else _single_tensor_genie
    fn(params, grads, ms, ss, steps, generator_for=generator_for, **hparams)


# ---------------------------------------------------------------------------
# diagnostics (spec formulas, only run by GENIE.statistics)
# ---------------------------------------------------------------------------
def _stats_terms(m: Tensor, s: Tensor, t: int, hp: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """(gsnr, preconditioner d/m_hat, lam) of one tensor.

    Same operations and dtype as the step, so ``lam < 1`` marks exactly the
    coordinates that received noise.
    """
    eps = hp["eps"]
    floor = _floor(eps, m.dtype)
    if hp["variant"] == "reference":
        inv_c, rho, k = _bias_scalars(hp["beta"], t)
        mh = m.mul(inv_c)
        m2 = mh.mul(mh)
        if k is None:
            var = torch.full_like(m, floor)
        else:
            var = s.mul(inv_c * k)
            var.addcmul_(mh, mh, value=-k)
            var = _guard(var, floor)
        lam = torch.reciprocal(var).clamp_max_(_INV_VAR_CAP).tanh_()
        var_mean = _guard(var.mul_(rho), floor)
        psi = (m2 + eps) / (m2 + eps + var_mean)
        return m2 / var_mean, psi * lam, lam
    m2 = m.mul(m)
    var = s.sub(m2).clamp_min_(floor)
    lam = torch.reciprocal(var).tanh_()
    return m2 / var, lam * m2 / s.add(floor), lam


# ---------------------------------------------------------------------------
# timm optimizer factory
# ---------------------------------------------------------------------------
def register_timm() -> bool:
    """Make ``timm.optim.create_optimizer_v2(model, "genie", ...)`` build :class:`GENIE`.

    Idempotent; returns False (and changes nothing) when timm or its registry
    is unavailable. timm's factory passes ``weight_decay`` and, for a model,
    builds a no-decay group for biases and norm parameters; both are ordinary
    GENIE parameter groups.
    """
    try:
        from timm.optim._optim_factory import OptimInfo, default_registry
    except ImportError:
        return False
    try:
        if default_registry.get_optimizer_info("genie").opt_class is GENIE:
            return True
    except ValueError:
        pass
    default_registry.register(
        OptimInfo(
            name="genie",
            opt_class=GENIE,
            description="GENIE: OSGR-guided preconditioning with variance-gated noise and update dropout (ICML 2025)",
            has_eps=True,
            has_momentum=False,
            has_betas=False,
        )
    )
    return True
