"""timm feature extractors and the classifier a DG algorithm trains."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from genie_dg.errors import UserInputError


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _cached_weights(name: str) -> str | None:
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


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | None = None,
    in_chans: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``: a feature extractor with ``num_features``.

    Pretrained weights come from ``weights`` (a local timm checkpoint, any classifier head is
    dropped) or, with ``pretrained=True``, from the local Hugging Face cache or the hub. When
    neither a file, the cache nor the hub is available this fails at once, instead of after
    timm's retries. Other keyword arguments go to the timm model (e.g. ``drop_rate``,
    ``channels``).
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        raise UserInputError(f"backbone.name={name!r} is not a timm model; similar names: {close}")
    options: dict[str, Any] = dict(num_classes=0, in_chans=in_chans, **kwargs)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserInputError(
                f"backbone.weights={weights}: no such file; give a local timm checkpoint "
                "(.safetensors/.pth) or set backbone.weights=null"
            )
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **options)
    if pretrained:
        cached = _cached_weights(name)
        if cached is not None:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **options)
        if not _hub_reachable():
            raise UserInputError(
                f"backbone.pretrained=true but the weights of {name} are not in the local cache and "
                "the model hub cannot be reached; set backbone.weights=/path/to/weights.safetensors "
                "or backbone.pretrained=false"
            )
    return timm.create_model(name, pretrained=pretrained, **options)


class Classifier(nn.Module):
    """A featurizer and a linear head (DomainBed's network shape).

    Dropout on the features, DomainBed's ``resnet_dropout``, is timm's ``drop_rate``.
    ``freeze_bn`` keeps every BatchNorm layer of the featurizer in eval mode whatever mode the
    network is put in: its running statistics stay those of the weights it starts from while its
    affine parameters train (DomainBed's ``ResNet.freeze_bn``, as the GENIE authors fine-tune).
    """

    def __init__(self, featurizer: nn.Module, num_classes: int, freeze_bn: bool = False) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.num_features: int = featurizer.num_features
        self.head = nn.Linear(self.num_features, num_classes)
        self.freeze_bn = freeze_bn
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.freeze_bn:
            for module in self.featurizer.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.featurizer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
