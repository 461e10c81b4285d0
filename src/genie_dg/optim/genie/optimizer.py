"""The :class:`GENIE` optimizer: parameter groups, state, generators, checkpoints, statistics."""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from genie_dg.errors import UserInputError
from genie_dg.optim.genie.formulas import VARIANTS, Hyperparameters, preconditioner, state_dtype
from genie_dg.optim.genie.functional import genie

# The keys of a GENIE parameter group besides "params" (and torch's optional "param_names").
_GROUP_KEYS = (
    "lr", "beta", "p", "weight_decay", "decoupled_weight_decay", "eps", "variant", "preconditioning",
    "noise", "mask", "noise_std", "maximize", "foreach", "error_if_nonfinite", "compiled",
)  # fmt: skip


class GENIE(Optimizer):
    r"""GENIE optimizer (Cho, Kim & Kim, ICML 2025): one-step generalization ratio guided
    preconditioning, variance-gated noise and a random mask on the update.

    The update rule, its two variants and their derivation are in ``docs/genie.md``; the
    formulas live in :mod:`genie_dg.optim.genie.formulas`. In short, per parameter tensor with
    gradient ``g`` at step ``t``: ``m`` and ``s``, moving averages of ``g`` and ``g^2``, give a
    variance estimate; the bias-corrected mean ``m_hat`` is scaled by ``psi * lam``
    (``psi = GSNR/(1+GSNR)``, ``lam = tanh(min(1/var, 10))``); noise ``(1-lam) * scale * xi``
    is added; each coordinate of the update is dropped with probability ``p`` (kept ones are
    rescaled by ``1/(1-p)``); ``theta <- theta - lr * (d + noise) * mask``.

    Randomness comes from the optimizer's own :class:`torch.Generator` (one per device, seeded
    with ``seed``; ``None`` takes :func:`torch.initial_seed`), whose states are part of
    :meth:`state_dict`, so a resumed run continues bit-identically and replicas built with the
    same seed draw the same noise and mask. Non-finite gradients never reach ``m`` and ``s``:
    the tensor's update is skipped (counted in ``state[p]["nonfinite_skips"]``, warned once),
    or with ``error_if_nonfinite=True`` a :class:`ValueError` is raised before any parameter
    changes. Sparse gradients raise :class:`RuntimeError`. bfloat16/float16 parameters are
    updated in float32 with float32 ``m`` and ``s``; complex parameters are updated through
    :func:`torch.view_as_real` (a complex parameter steps exactly as its real view).

    Args:
        params: parameters, named parameters or parameter groups.
        lr: step size (SGD-like scale; 0.015 in the paper); a float or a one-element tensor.
        beta: moving-average factor of m and s, ``0 <= beta < 1``.
        p: probability of dropping a coordinate from the update, ``0 <= p < 1``.
        weight_decay: L2 (or decoupled) weight decay, ``>= 0``.
        decoupled_weight_decay: use the AdamW form ``theta <- theta*(1 - lr*wd)``.
        eps: numerical floor, ``>= 0`` (0: the smallest normal number where it is a divisor).
        variant: ``"reference"`` (the authors' code) or ``"algorithm1"`` (the pseudo-code).
        preconditioning, noise, mask: the paper's ablation switches (all off: SGD on the
            bias-corrected momentum).
        noise_std: standard deviation of the noise of ``variant="algorithm1"``.
        seed: generator seed (``None``: :func:`torch.initial_seed`).
        maximize: ascend instead of descend.
        foreach: ``None`` picks the fastest eager implementation for the parameters' device
            (:func:`genie_dg.optim.genie.functional.default_foreach`); ``True``/``False`` force
            the multi-tensor or the per-tensor one. Both give identical results.
        error_if_nonfinite: raise instead of skipping on non-finite gradients.
        compiled: run the update as one ``torch.compile``d kernel per group (first step
            compiles; inductor needs a C++ compiler on the CPU). Its mask is an in-kernel hash
            of the coordinate and a per-step key drawn from the generator: same distribution as
            the eager mask, not the same stream (``docs/genie.md``).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.015,
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
            lr=lr, beta=beta, p=p, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            eps=eps, variant=variant, preconditioning=preconditioning, noise=noise, mask=mask,
            noise_std=noise_std, maximize=maximize, foreach=foreach, error_if_nonfinite=error_if_nonfinite,
            compiled=compiled,
        )  # fmt: skip
        _validate_hparams(defaults)
        self._seed = _validate_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        # Generator states loaded before the generator of their device exists.
        self._pending_generator_states: dict[str, Tensor] = {}
        self._warned_nonfinite = False
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the merged group before torch registers it, so a bad group leaves the
        # optimizer unchanged.
        if isinstance(param_group, dict):
            _validate_hparams({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch adds "differentiable" to the defaults here; GENIE has no such option, and a
        # default would reach every group added later and every saved state dict.
        self.defaults = {k: v for k, v in self.defaults.items() if k in _GROUP_KEYS}
        self.__dict__.setdefault("_seed", int(torch.initial_seed()))
        self.__dict__.setdefault("_generators", {})
        self.__dict__.setdefault("_pending_generator_states", {})
        self.__dict__.setdefault("_warned_nonfinite", False)
        for group in self.param_groups:
            for key in _GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
        for st in self.state.values():
            # Older or converted checkpoints store the step count as a number.
            if "step" in st and not torch.is_tensor(st["step"]):
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)

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
                # A checkpoint written by another replica (cuda:0 read on cuda:1) still
                # continues its stream when the device type is unambiguous.
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

    # ------------------------------------------------------------ checkpoints
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
        self._restore_moment_dtypes(saved_state)
        if seed is not None:
            self._seed = int(seed)
        if gen_states is not None:
            self._generators = {}
            self._pending_generator_states = {k: v.clone() for k, v in gen_states.items()}

    def _restore_moment_dtypes(self, saved_state: dict[Any, dict[str, Any]]) -> None:
        # torch casts floating state to the parameter dtype; bf16/fp16 parameters keep float32
        # moments, so restore them at full precision.
        params = [param for group in self.param_groups for param in group["params"]]
        for index, param in enumerate(params):
            saved, st = saved_state.get(index), self.state.get(param)
            if saved is None or not st:
                continue
            for key in ("m", "s"):
                if key in saved and st[key].dtype != state_dtype(param):
                    st[key] = saved[key].to(device=param.device, dtype=state_dtype(param)).clone()

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss; it is called under
                ``torch.enable_grad()`` and its result is returned.
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
            work.append(self._init_group(items))
        work = self._drop_nonfinite(work)
        for group, (params, grads, ms, ss, steps) in zip(self.param_groups, work):
            genie(
                params, grads, ms, ss, steps,
                generator_for=self._generator,
                foreach=group["foreach"],
                compiled=bool(group.get("compiled", False)),
                **_hparams(group),
            )  # fmt: skip
        return loss

    def _init_group(self, items: list[tuple[int, Tensor]]) -> list[list]:
        params, grads, ms, ss, steps, indices = [], [], [], [], [], []
        for index, param in items:
            if param.grad.is_sparse:
                raise RuntimeError(
                    "GENIE does not support sparse gradients; use dense gradients (e.g. nn.Embedding(sparse=False))"
                )
            state = self.state[param]
            if len(state) == 0:
                # step lives on the CPU (as in non-capturable Adam) so reading it never
                # synchronises an accelerator.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                sdtype = state_dtype(param)
                state["m"] = torch.zeros_like(param, dtype=sdtype, memory_format=torch.preserve_format)
                state["s"] = torch.zeros_like(param, dtype=sdtype, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(param.grad)
            ms.append(state["m"])
            ss.append(state["s"])
            steps.append(state["step"])
            indices.append(index)
        return [params, grads, ms, ss, steps, indices]

    def _drop_nonfinite(self, work: list[list]) -> list[list]:
        """Each group's (params, grads, ms, ss, steps) without the tensors whose gradients are
        not finite (or raise, with ``error_if_nonfinite``)."""
        grads = [g for w in work for g in w[1]]
        finite = _all_finite_flags(grads) if grads else []
        if all(finite):
            return [w[:5] for w in work]
        out, bad, k = [], [], 0
        for group, w in zip(self.param_groups, work):
            keep = []
            for j in range(len(w[0])):
                if finite[k]:
                    keep.append(j)
                else:
                    bad.append((group, w[5][j], w[0][j]))
                k += 1
            out.append([[lst[j] for j in keep] for lst in w[:5]])
        for group, index, param in bad:
            if group["error_if_nonfinite"]:
                raise ValueError(
                    f"GENIE: non-finite gradient for parameter {index} "
                    f"(shape {tuple(param.shape)}); no parameter was updated"
                )
        for _, _, param in bad:
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
        return out

    @property
    def nonfinite_skips(self) -> int:
        """Total number of tensor updates skipped because of non-finite gradients."""
        return sum(int(st.get("nonfinite_skips", 0)) for st in self.state.values())

    # ------------------------------------------------------------- statistics
    @torch.no_grad()
    def statistics(self) -> list[dict[str, float]]:
        """Diagnostics per parameter group, recomputed from ``m``, ``s`` and ``step``.

        Nothing is stored by :meth:`step`; the values are exactly those of each tensor's last
        update (:func:`~genie_dg.optim.genie.formulas.preconditioner`). Means are over all
        coordinates of the group's tensors that have state (a complex one counts twice).

        * ``gsnr_mean``: mean GSNR, ``m_hat^2 / var_mean`` (reference) or ``m^2 / var``
          (algorithm1).
        * ``precond_mean``: mean preconditioner ``d / m_hat`` (1 when preconditioning is off).
        * ``noise_active_fraction``: fraction of coordinates with ``1 - lam > 0`` (0 when noise
          is off).
        * ``mask_fraction``: expected fraction of coordinates dropped per step (``p``, 0 when
          the mask is off); the masks themselves are not kept.
        * ``lam_mean``, ``step`` (largest step count), ``numel``, ``nonfinite_skips``.
        """
        return [self._group_statistics(group) for group in self.param_groups]

    def _group_statistics(self, group: dict[str, Any]) -> dict[str, float]:
        hp = Hyperparameters.of_group(group)
        n, max_step, skips = 0, 0, 0
        sums = {"gsnr": 0.0, "precond": 0.0, "active": 0.0, "lam": 0.0}
        for param in group["params"]:
            st = self.state.get(param)
            if not st:
                continue
            skips += int(st.get("nonfinite_skips", 0))
            t = int(st["step"])
            if t == 0:
                continue
            max_step = max(max_step, t)
            factor, lam, gsnr = preconditioner(st["m"], st["s"], t, beta=hp.beta, eps=hp.eps, variant=hp.variant)
            sums["gsnr"] += float(gsnr.sum(dtype=torch.float64))
            sums["precond"] += float(factor.sum(dtype=torch.float64)) if hp.preconditioning else lam.numel()
            sums["lam"] += float(lam.sum(dtype=torch.float64))
            if hp.noise:
                sums["active"] += float((lam < 1).sum())
            n += lam.numel()
        denom = max(n, 1)
        return {
            "gsnr_mean": sums["gsnr"] / denom,
            "precond_mean": sums["precond"] / denom,
            "lam_mean": sums["lam"] / denom,
            "noise_active_fraction": sums["active"] / denom,
            "mask_fraction": float(hp.p) if hp.mask else 0.0,
            "step": float(max_step),
            "numel": float(n),
            "nonfinite_skips": float(skips),
        }


# ---------------------------------------------------------------------------
# validation and small helpers
# ---------------------------------------------------------------------------
def _hparams(group: dict[str, Any]) -> dict[str, Any]:
    return Hyperparameters.of_group(group).__dict__


def _validate_hparams(h: dict[str, Any]) -> None:
    def bad(name: str, expected: str) -> UserInputError:
        return UserInputError(f"GENIE: invalid {name}={h[name]!r}; expected {expected}")

    def number(name: str) -> float:
        value = h[name]
        if isinstance(value, Tensor) and value.numel() == 1 and not value.requires_grad:
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(name, "a real number")
        return float(value)

    if isinstance(h["lr"], Tensor) and h["lr"].numel() != 1:
        # torch's own wording (torch.optim.Adam), which torch's generic optimizer checks expect.
        raise UserInputError("Tensor lr must be 1-element; pass a float or a one-element tensor as GENIE's lr")
    ranges = (
        ("lr", lambda v: v >= 0.0, "lr >= 0"),
        ("beta", lambda v: 0.0 <= v < 1.0, "0 <= beta < 1"),
        ("p", lambda v: 0.0 <= v < 1.0, "0 <= p < 1"),
        ("weight_decay", lambda v: v >= 0.0, "weight_decay >= 0"),
        ("eps", lambda v: v >= 0.0, "eps >= 0"),
        ("noise_std", lambda v: v >= 0.0, "noise_std >= 0"),
    )
    for name, ok, expected in ranges:
        if not ok(number(name)):
            raise bad(name, expected)
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


def _all_finite_flags(grads: list[Tensor]) -> list[bool]:
    """One bool per gradient, with one host read per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    flags = [True] * len(grads)
    for device, idx in by_device.items():
        # A sum is NaN/inf when an entry is; it can also overflow for huge finite entries, so
        # suspects are confirmed with an exact test.
        if device.type == "cpu":
            sums = [grads[i].sum() for i in idx]
        else:
            sums = torch._foreach_norm([grads[i] for i in idx], 1)
        ok = torch.stack([x.abs().float() if x.is_complex() else x.float() for x in sums]).isfinite().tolist()
        for i, f in zip(idx, ok):
            flags[i] = f or bool(torch.isfinite(grads[i]).all())
    return flags
