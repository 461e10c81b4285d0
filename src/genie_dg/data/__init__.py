"""Multi-domain datasets and the DataModule that splits them for domain generalization.

The exports load on first use (PEP 562), so that ``genie-dg download`` starts without
importing Lightning and torchvision.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BalancedDomainBatchSampler": "genie_dg.data.datamodule",
    "EvalSet": "genie_dg.data.datamodule",
    "MultiDomainDataModule": "genie_dg.data.datamodule",
    "domain_image_folder": "genie_dg.data.image_folder",
    "colored_mnist": "genie_dg.data.mnist",
    "rotated_mnist": "genie_dg.data.mnist",
    "DomainSubset": "genie_dg.data.multidomain",
    "MultiDomainDataset": "genie_dg.data.multidomain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'genie_dg.data' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
