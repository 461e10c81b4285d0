"""A run's configuration as the run directory keeps it: what a run computes, its key, and
the difference between two configurations named in one line."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Parts of the config that say where things are written, not what a run computes.
NOT_IN_RUN_KEY = ("hydra", "paths", "logger")
# Where a run starts from: a job started again with ckpt_path=last must find its own directory.
START_KEYS = ("ckpt_path", "ckpt_weights_only")
# How many differing keys one refusal names.
LISTED_DIFFERENCES = 3


def keyed_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without :data:`NOT_IN_RUN_KEY` and :data:`START_KEYS`: what a run computes.

    Interpolations into ``paths`` (checkpoint folders...) resolve to the path's name, not its
    value, so the same run moved elsewhere keeps its key."""
    kept = {
        key: node for key, node in cfg.items_ex(resolve=False) if key not in NOT_IN_RUN_KEY and key not in START_KEYS
    }
    kept["paths"] = {name: f"<paths.{name}>" for name in cfg.get("paths") or {}}
    resolved = OmegaConf.to_container(OmegaConf.create(kept), resolve=True)
    del resolved["paths"]
    # A JSON round trip: what is stored (run_config.json, checkpoints) compares equal to it.
    return json.loads(json.dumps(resolved, sort_keys=True, default=str))


def run_key(cfg: DictConfig) -> str:
    """A 12-hex-digit hash of :func:`keyed_config`: a multirun job's directory name, and how
    ``ckpt_path=last`` recognises earlier runs of the same config."""
    text = json.dumps(keyed_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): node}


def config_difference(theirs: dict[str, Any], ours: dict[str, Any], their_name: str) -> str | None:
    """``<key> is <theirs> <their_name>, <ours> here`` for the first differing keys, or None."""
    a, b = _flatten(theirs), _flatten(ours)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    if not keys:
        return None
    shown = "; ".join(
        f"{k} is {json.dumps(a.get(k, '<unset>'))} {their_name}, {json.dumps(b.get(k, '<unset>'))} here"
        for k in keys[:LISTED_DIFFERENCES]
    )
    more = len(keys) - LISTED_DIFFERENCES
    return shown + (f" and {more} more" if more > 0 else "")
