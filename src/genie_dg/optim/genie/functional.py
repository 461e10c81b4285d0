"""GENIE's functional update, the one place that chooses an implementation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from genie_dg.optim.genie.compiled import compiled_genie
from genie_dg.optim.genie.eager import multi_tensor_genie, single_tensor_genie
from genie_dg.optim.genie.formulas import Hyperparameters


def default_foreach(params: list[Tensor]) -> bool:
    """The implementation ``foreach=None`` picks: the fastest on the parameters' device.

    On the CPU the per-tensor path, whose slices stay in the cache, is faster than
    ``torch._foreach_*`` (which on the CPU loops over tensors operation by operation);
    measurement in ``docs/optimizers.md``. On an accelerator the multi-tensor path, which
    launches one kernel per operation and bucket instead of one per operation and tensor,
    provided all parameters share the device.
    """
    devices = {p.device for p in params}
    return len(devices) == 1 and next(iter(devices)).type != "cpu"


def _as_real(tensors: list[Tensor]) -> list[Tensor]:
    # Complex tensors are updated through their real views, as torch's element-wise
    # optimizers do: a complex parameter steps exactly as its real view would.
    return [torch.view_as_real(x) if torch.is_complex(x) else x for x in tensors]


def genie(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    ss: list[Tensor],
    steps: list[Tensor],
    *,
    generator_for: Callable[[torch.device], torch.Generator],
    foreach: bool | None = None,
    compiled: bool = False,
    **hparams: Any,
) -> None:
    """Functional GENIE update of ``params``, ``ms``, ``ss`` and ``steps`` in place.

    ``generator_for(device)`` returns the generator for the draws on that device; ``hparams``
    are a group's hyper-parameters (:class:`.formulas.Hyperparameters`, see :class:`GENIE`).
    ``compiled=True`` runs the compiled kernel; otherwise ``foreach`` picks the eager path
    (``None``: :func:`default_foreach`).
    """
    if not params:
        return
    hp = Hyperparameters(**hparams)
    if any(torch.is_complex(x) for x in params):
        params, grads, ms, ss = (_as_real(x) for x in (params, grads, ms, ss))
    if compiled:
        impl = compiled_genie
    else:
        use_foreach = default_foreach(params) if foreach is None else foreach
        impl = multi_tensor_genie if use_foreach else single_tensor_genie
    impl(params, grads, ms, ss, steps, generator_for=generator_for, hp=hp)
