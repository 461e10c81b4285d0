"""Hyper-parameter sweeps: DomainBed's random draws, and run directories that make sweeps resumable.

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

**Run directories.** In a multirun, a job's directory is named by :func:`run_key`, a hash of its
resolved config without ``paths``, ``logger`` and ``hydra`` (where files go and where results are
logged change nothing a run computes). Re-running a sweep therefore finds each job's earlier
directory: :data:`DONE_MARKER` there means the job finished and is skipped, and
``checkpoints/last.ckpt`` without it means the job was interrupted and resumes from there.
A process training in a directory holds :func:`run_lock` on it, so sweeps started side by side
over the same jobs share them out instead of training one job twice into the same files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from genie_dg.errors import UserInputError

log = logging.getLogger(__name__)

DONE_MARKER = "done"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# Holds the run's run_key, so `ckpt_path=last` can find earlier runs of the same config.
RESUME_KEY_FILE = "resume_key"
RUN_LOCK_FILE = ".run_lock"
DISTRIBUTIONS = ("uniform", "log10_uniform", "pow2_uniform", "choice")
# Parts of the config that say where things are written, not what a run computes.
NOT_IN_RUN_KEY = ("hydra", "paths", "logger")


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


def searched_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The current value of every searched hyper-parameter, as ``{"<group>.<name>": value}``."""
    return {
        f"{group}.{name}": OmegaConf.to_container(cfg[group], resolve=True).get(name)
        for group in searched_groups(cfg)
        for name in cfg[group].search
    }


def sample_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Replace every searched hyper-parameter by its draw for ``cfg.hparams_seed`` (0: keep the
    defaults), in place; return the values the run trains with."""
    hparams_seed = int(cfg.get("hparams_seed", 0))
    if hparams_seed != 0:
        run_seed = seed_hash(hparams_seed, int(cfg.trial_seed))
        for group in searched_groups(cfg):
            for name, spec in cfg[group].search.items():
                where = f"{group}.search.{name}"
                if name not in cfg[group]:
                    raise UserInputError(f"{where}: {group} has no default {name!r} to replace by a draw")
                cfg[group][name] = draw(spec, seed_hash(run_seed, f"{group}.{name}"), where)
    return searched_hparams(cfg)


def run_key(cfg: DictConfig) -> str:
    """A 12-hex-digit hash of the resolved config, leaving out :data:`NOT_IN_RUN_KEY`.

    ``ckpt_path`` counts as null: where a run resumes from changes nothing it computes, so a
    job started again with ``ckpt_path=last`` finds its own directory (the key of a config
    with ``ckpt_path: null``, as every sweep writes, is unchanged by this rule)."""
    kept = {key: node for key, node in cfg.items_ex(resolve=False) if key not in NOT_IN_RUN_KEY}
    if "ckpt_path" in kept:
        kept["ckpt_path"] = None
    # Interpolations into paths (checkpoint folders...) resolve to the path's name, not its value.
    kept["paths"] = {name: f"<paths.{name}>" for name in cfg.get("paths") or {}}
    resolved = OmegaConf.to_container(OmegaConf.create(kept), resolve=True)
    del resolved["paths"]
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def locks_its_run() -> bool:
    """Whether this process locks its run directory: yes when it is the only process of its
    launch, or the first of the DDP replicas Lightning starts from it (Lightning gives the others
    ``LOCAL_RANK`` / ``NODE_RANK`` >= 1, and they share the first one's directory). Processes that
    torchrun (``WORLD_SIZE``) or SLURM (``SLURM_NTASKS``) start several at a time decide each on
    its own whether to train, so none of them locks: one that left would hang the others."""
    env = os.environ
    if int(env.get("LOCAL_RANK", 0)) or int(env.get("NODE_RANK", 0)):
        return False
    return all(int(env.get(key, 1)) <= 1 for key in ("WORLD_SIZE", "SLURM_NTASKS"))


@contextmanager
def run_lock(run_dir: Path) -> Iterator[str | None]:
    """Hold an exclusive lock on ``run_dir`` for the block. Yields None when this process holds
    it (or does not lock: :func:`locks_its_run`), or else the holder's pid (as written in the
    lock file) and holds nothing.

    ``flock``: the kernel drops the lock when its holder exits, however it exits, so a killed
    run leaves no lock behind on a local disk (a network filesystem may keep a crashed node's
    lock until its lease ends). Where the filesystem cannot lock at all, the run goes on unlocked."""
    if not locks_its_run():
        yield None
        return
    with open(run_dir / RUN_LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            yield lock.read().strip() or "unknown"
            return
        except OSError as err:
            log.warning("cannot lock %s (%s): training without the lock", run_dir, err.strerror or err)
            yield None
            return
        try:
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            yield None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def latest_run(runs_dir: Path, key: str, exclude: Path | None = None) -> Path | None:
    """The directory under ``runs_dir`` whose :data:`RESUME_KEY_FILE` holds ``key`` and which has a
    last checkpoint, with the newest checkpoint (finished or not); None if there is none.
    Directories this user cannot read are passed over."""
    found = []
    try:
        runs = list(runs_dir.iterdir()) if runs_dir.is_dir() else []
    except OSError:
        runs = []
    for run in runs:
        try:
            marker, checkpoint = run / RESUME_KEY_FILE, run / LAST_CHECKPOINT
            if run != exclude and marker.is_file() and checkpoint.is_file() and marker.read_text().strip() == key:
                found.append((checkpoint.stat().st_mtime, str(run)))
        except OSError:
            continue
    return Path(max(found)[1]) if found else None


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
        for name, spec in cfg[group].search.items()
    }


def _run_key_resolver(*, _root_: DictConfig) -> str:
    return run_key(_root_)


def _optuna_space_resolver(*, _root_: DictConfig) -> dict[str, str]:
    return optuna_space(_root_)


# ${run_key:} names a multirun job's directory (conf/hydra/default.yaml: hydra.sweep.subdir);
# ${optuna_space:} is the search space of hparams_search=optuna; ${cwd:} is the working directory
# (conf/paths/default.yaml), which a sweeper can resolve before Hydra's runtime exists.
_RESOLVERS = (("run_key", _run_key_resolver), ("optuna_space", _optuna_space_resolver), ("cwd", os.getcwd))
for _name, _resolver in _RESOLVERS:
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver, use_cache=False)


def sweep_group() -> str | None:
    """The name of the running multirun's directory (a W&B group), or None outside a multirun."""
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return Path(hydra.sweep.dir).name if hydra.mode == RunMode.MULTIRUN else None
