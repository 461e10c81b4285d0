"""The OmegaConf resolvers genie-dg's configs use, registered by :func:`register_resolvers`.

``train.py`` registers them before Hydra composes; anything else that composes the configs
(Hydra's compose API in a notebook or a test, ``genie-dg verify-data``) calls
:func:`register_resolvers` first::

    from hydra import compose, initialize_config_dir
    from genie_dg.conf import CONFIG_DIR
    from genie_dg.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _run_key(*, _root_: DictConfig) -> str:
    from genie_dg.run_dir import run_key

    return run_key(_root_)


def _optuna_space(*, _root_: DictConfig) -> dict[str, str]:
    from genie_dg.sweep import optuna_space

    return optuna_space(_root_)


# ${run_key:} names a multirun job's directory (genie_dg/conf/hydra/default.yaml: hydra.sweep.subdir);
# ${optuna_space:} is the search space of hparams_search=optuna; ${cwd:} is the working directory
# (genie_dg/conf/paths/default.yaml), which a sweeper can resolve before Hydra's runtime exists.
RESOLVERS: dict[str, Any] = {"run_key": _run_key, "optuna_space": _optuna_space, "cwd": os.getcwd}


def register_resolvers() -> None:
    """Register :data:`RESOLVERS` with OmegaConf (again: no-op)."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver, use_cache=False)
