"""GENIE (Cho, Kim & Kim, ICML 2025), in layers as ``torch.optim``'s optimizers are:

* :mod:`.formulas`: the update's formulas, once (with :func:`preconditioner`, which the
  diagnostics use); the math and its derivation are in ``docs/genie.md``;
* :mod:`.eager`: the per-tensor and the multi-tensor (``torch._foreach_*``) paths;
* :mod:`.compiled`: the ``torch.compile``d path;
* :mod:`.functional`: :func:`genie`, which picks the path (the rule for ``foreach=None``);
* :mod:`.optimizer`: the :class:`GENIE` optimizer (groups, state, generators, checkpoints);
* :mod:`.timm_registry`: :func:`register_timm`, called explicitly by whoever builds
  optimizers through timm's factory.
"""

from genie_dg.optim.genie.formulas import VARIANTS, Factor, Hyperparameters, preconditioner
from genie_dg.optim.genie.functional import default_foreach, genie
from genie_dg.optim.genie.optimizer import GENIE
from genie_dg.optim.genie.timm_registry import register_timm

__all__ = [
    "GENIE",
    "VARIANTS",
    "Factor",
    "Hyperparameters",
    "default_foreach",
    "genie",
    "preconditioner",
    "register_timm",
]
