"""Hyper-parameter search: DomainBed's random draws, and the same space for Optuna.

**Draws.** Every top-level config group (``algorithm``, ``optimizer``, ...) may carry a ``search``
mapping from its hyper-parameters to distributions, DomainBed's:

- ``{dist: uniform, low, high}``: U(low, high);
- ``{dist: log10_uniform, low, high}``: 10 ** U(low, high);
- ``{dist: pow2_uniform, low, high}``: 2 ** U(low, high);
- ``{dist: choice, values: [...]}``: one of the values, each equally likely;
- ``int: true`` rounds a drawn number down to an integer, as DomainBed's ``int(2 ** U(3, 9))``.

``hparams_seed=0`` keeps every default; any other seed replaces each searched value by a draw from
a generator seeded by a hash of ``(hash(hparams_seed, trial_seed), "<group>.<name>")``, DomainBed's
``hparams_registry`` rule: a hyper-parameter's draw depends on nothing else, so adding one to a
search never changes the others', and every target domain of a (hparams_seed, trial_seed) pair
trains with the same values (leave-one-domain-out selection compares them).

Run directories (keys, locks, resumption) are :mod:`genie_dg.run_dir`'s.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from genie_dg.errors import UserInputError

DISTRIBUTIONS = ("uniform", "log10_uniform", "pow2_uniform", "choice")


def seed_hash(*args: Any) -> int:
    """DomainBed's ``misc.seed_hash``: an integer in [0, 2**31) from the arguments' ``str``."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def draw(spec: DictConfig | dict[str, Any], seed: int, where: str) -> Any:
    """One value from the distribution ``spec`` with a generator seeded by ``seed``."""
    random = np.random.RandomState(seed)
    dist = spec.get("dist")
    if dist == "choice":
        values = list(spec["values"])
        # Indexing keeps each value's own type (numpy's choice would turn them into numpy scalars).
        return values[int(random.choice(len(values)))]
    if dist not in DISTRIBUTIONS:
        raise UserInputError(f"{where}.dist={dist!r}: choose one of {', '.join(DISTRIBUTIONS)}")
    value = random.uniform(float(spec["low"]), float(spec["high"]))
    if dist == "log10_uniform":
        value = 10.0**value
    elif dist == "pow2_uniform":
        value = 2.0**value
    return int(value) if spec.get("int", False) else float(value)


def searched_groups(cfg: DictConfig) -> list[str]:
    """Top-level config groups that declare a non-empty ``search`` mapping, in config order."""
    return [
        group
        for group, node in cfg.items_ex(resolve=False)
        if isinstance(node, DictConfig) and isinstance(node.get("search"), DictConfig) and node.search
    ]


def search_specs(cfg: DictConfig, group: str) -> dict[str, DictConfig]:
    """``group``'s searched hyper-parameters and their distributions. A ``null`` spec leaves a
    hyper-parameter at its default: a more specific config (a dataset family's, an experiment's)
    switches off a search the group's own config declares."""
    return {name: spec for name, spec in cfg[group].search.items() if spec is not None}


def searched_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The current value of every searched hyper-parameter, as ``{"<group>.<name>": value}``."""
    return {
        f"{group}.{name}": OmegaConf.to_container(cfg[group], resolve=True).get(name)
        for group in searched_groups(cfg)
        for name in search_specs(cfg, group)
    }


def sample_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Replace every searched hyper-parameter by its draw for ``cfg.hparams_seed`` (0: keep the
    defaults), in place; return the values the run trains with."""
    hparams_seed = int(cfg.get("hparams_seed", 0))
    if hparams_seed != 0:
        run_seed = seed_hash(hparams_seed, int(cfg.trial_seed))
        for group in searched_groups(cfg):
            for name, spec in search_specs(cfg, group).items():
                where = f"{group}.search.{name}"
                if name not in cfg[group]:
                    raise UserInputError(f"{where}: {group} has no default {name!r} to replace by a draw")
                cfg[group][name] = draw(spec, seed_hash(run_seed, f"{group}.{name}"), where)
    return searched_hparams(cfg)


def optuna_distribution(spec: DictConfig | dict[str, Any], where: str) -> str:
    """A ``search`` distribution in hydra-optuna-sweeper's override syntax. 10 ** U(a, b) and
    2 ** U(a, b) are both log-uniform on their range."""
    dist = spec.get("dist")
    if dist == "choice":
        return "choice(" + ", ".join(json.dumps(v) for v in spec["values"]) + ")"
    if dist not in DISTRIBUTIONS:
        raise UserInputError(f"{where}.dist={dist!r}: choose one of {', '.join(DISTRIBUTIONS)}")
    low, high = float(spec["low"]), float(spec["high"])
    if dist == "log10_uniform":
        low, high = 10.0**low, 10.0**high
    elif dist == "pow2_uniform":
        low, high = 2.0**low, 2.0**high
    # repr keeps a float a float: interval(0, 1) would be an integer range to the sweeper.
    text = f"interval({low!r}, {high!r})"
    if dist != "uniform":
        text = f"tag(log, {text})"
    return f"int({text})" if spec.get("int", False) else text


def optuna_space(cfg: DictConfig) -> dict[str, str]:
    """``hydra.sweeper.params`` for hydra-optuna-sweeper: every ``search`` mapping of ``cfg``."""
    return {
        f"{group}.{name}": optuna_distribution(spec, f"{group}.search.{name}")
        for group in searched_groups(cfg)
        for name, spec in search_specs(cfg, group).items()
    }


def sweep_group() -> str | None:
    """The name of the running multirun's directory (a W&B group), or None outside a multirun."""
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return Path(hydra.sweep.dir).name if hydra.mode == RunMode.MULTIRUN else None
