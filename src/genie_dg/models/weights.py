"""Where a backbone's starting weights come from, loading them, and the record a run keeps.

A backbone starts from (first match wins):

1. ``backbone.weights=<file>``: a local ``.safetensors`` or ``.pth`` state dict;
2. with ``backbone.pretrained=true``, genie-dg's weights cache (``$GENIE_DG_WEIGHTS``, by default
   ``~/.cache/genie-dg/weights``, as ``$HF_HOME`` and ``$TORCH_HOME`` work), which
   ``genie-dg fetch-weights`` fills on a machine with a network (clusters whose nodes have none
   point ``$GENIE_DG_WEIGHTS`` at a shared folder);
3. the Hugging Face cache, then the hub (timm's own download);
4. random initialisation (``pretrained=false``).

Every run records which, as :class:`WeightsRecord` (``summary.json`` and ``results.jsonl``): the
timm tag, or the file's path and sha256.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from genie_dg.errors import UserInputError

# Key layouts of a weights file: "timm" (the model's own names) or "in_order" (another
# implementation's names, mapped tensor by tensor in order; every shape must agree).
KEY_LAYOUTS = ("timm", "in_order")
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightsRecord:
    """What a backbone started from. ``source``: ``file``, ``cache`` (genie-dg's weights cache),
    ``hub`` (timm's download or the Hugging Face cache) or ``random``."""

    source: str
    model: str
    path: str | None = None
    sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_cache_dir() -> Path:
    """genie-dg's weights cache: ``$GENIE_DG_WEIGHTS``, or ``~/.cache/genie-dg/weights``."""
    return Path(os.environ.get("GENIE_DG_WEIGHTS") or "~/.cache/genie-dg/weights").expanduser()


def cache_file(name: str) -> Path:
    """The weights cache's file for the timm model ``name`` (its tag included)."""
    return weights_cache_dir() / f"{name}.safetensors"


def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def hf_cached_file(name: str) -> str | None:
    """The file of timm model ``name`` in the local Hugging Face cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or torch file; anything else is refused in one line."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: a weights file must never run code pickled into it.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Never torch's advice to retry with weights_only=False: that would run the file's code.
        raise UserInputError(
            f"{what}={path}: not a weights file (neither a safetensors file nor a torch file of tensors "
            "and plain containers); give a .safetensors or .pth state dict of tensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserInputError(
            f"{what}={path}: not a weights file (a safetensors or torch state dict of tensors): {reason[:160]}"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"{what}={path}: not a weights file (it holds no state dict of tensors)")
    return state


def load_weights(model: nn.Module, path: Path, key_layout: str = "timm", what: str = "backbone.weights") -> None:
    """Load ``path`` into the feature extractor ``model`` (built without a classifier head).

    The file's classifier (tensors beyond the feature extractor's) is dropped; any other
    difference (a missing tensor, another shape) is refused, naming it.
    """
    if key_layout not in KEY_LAYOUTS:
        raise UserInputError(f"backbone.weights_keys={key_layout!r}: choose one of {', '.join(KEY_LAYOUTS)}")
    state = read_state_dict(path, what)
    own = model.state_dict()
    if key_layout == "in_order":
        if len(state) < len(own):
            raise UserInputError(
                f"{what}={path}: {len(state)} tensors for the {len(own)} of {type(model).__name__}; "
                "backbone.weights_keys=in_order needs one per model tensor, in order"
            )
        for (name, target), (key, tensor) in zip(own.items(), state.items()):
            if tensor.shape != target.shape:
                raise UserInputError(
                    f"{what}={path}: tensor {key} {tuple(tensor.shape)} does not fit {name} "
                    f"{tuple(target.shape)} in order; these weights are for another network"
                )
        state = dict(zip(own, state.values()))
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        listed = ", ".join((missing + wrong)[:5])
        hint = (
            "; if the file names its tensors another way in the same order, set backbone.weights_keys=in_order"
            if missing and key_layout == "timm"
            else ""
        )
        raise UserInputError(
            f"{what}={path}: {len(missing)} tensor(s) of the model missing and {len(wrong)} of another "
            f"shape ({listed}){hint}"
        )
    model.load_state_dict({k: state[k] for k in own})


def write_atomically(state: dict[str, torch.Tensor], target: Path) -> None:
    """Write a safetensors file so that a crash leaves the old file or the new one, never half."""
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def fetch_weights(name: str) -> Path:
    """Store the pretrained weights of timm model ``name`` in the weights cache, downloading them
    with timm (from the Hugging Face cache or the hub) where they are not there yet."""
    target = cache_file(name)
    if target.is_file():
        return target
    if hf_cached_file(name) is None and not hub_reachable():
        raise UserInputError(
            f"cannot fetch the weights of {name}: the model hub cannot be reached and they are not in the "
            "Hugging Face cache; run genie-dg fetch-weights on a machine with a network"
        )
    model = timm.create_model(name, pretrained=True, num_classes=0)
    write_atomically(model.state_dict(), target)
    return target


# `genie-dg fetch-weights`: fill the weights cache where there is a network.


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides naming the run(s) whose weights to store, as train.py takes them "
        "(e.g. dataset=pacs, backbone=resnet50, experiment=sweep_vlcs)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="a timm model name with its tag (e.g. resnet50.tv_in1k) to store as well; repeatable",
    )


def run(args: Any) -> int:
    from hydra import compose, initialize_config_dir

    from genie_dg.conf import CONFIG_DIR

    names = list(args.model)
    if args.overrides or not names:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            backbone = compose(config_name="train", overrides=list(args.overrides)).backbone
        if not backbone.get("pretrained", False):
            raise UserInputError(
                f"backbone {backbone.name} of this config starts from random weights (backbone.pretrained=false): "
                "nothing to fetch; name a config that fine-tunes, e.g. dataset=pacs"
            )
        names.append(str(backbone.name))
    for name in names:
        if not timm.is_model(name):
            raise UserInputError(f"--model {name}: not a timm model name")
        target = fetch_weights(name)
        print(f"{name}: {target} (sha256 {sha256_of(target)})")
    return 0
