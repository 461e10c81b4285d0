"""timm feature extractors and the classifier a DG algorithm trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from genie_dg.errors import UserInputError
from genie_dg.models.weights import (
    WeightsRecord,
    cache_file,
    hf_cached_file,
    hub_reachable,
    load_weights,
    sha256_of,
)


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | None = None,
    in_chans: int = 3,
    weights_keys: str = "timm",
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``: a feature extractor with ``num_features``.

    Its starting weights come from a local file (``weights``; ``weights_keys=in_order`` maps a
    file that names its tensors another way, tensor by tensor), or with ``pretrained=True`` from
    genie-dg's weights cache, the Hugging Face cache or the hub, in that order (see
    :mod:`genie_dg.models.weights`); where none has them this fails at once, instead of after
    timm's retries. The returned module's ``weights_record`` says which. Other keyword arguments
    go to the timm model (e.g. ``drop_rate``, ``channels``).
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        raise UserInputError(f"backbone.name={name!r} is not a timm model; similar names: {close}")
    options: dict[str, Any] = dict(num_classes=0, in_chans=in_chans, **kwargs)
    if weights is not None:
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise UserInputError(
                f"backbone.weights={weights}: no such file; give a local timm checkpoint "
                "(.safetensors/.pth) or set backbone.weights=null"
            )
        model = timm.create_model(name, **options)
        load_weights(model, path, weights_keys)
        model.weights_record = WeightsRecord("file", name, str(path), sha256_of(path))
        return model
    if not pretrained:
        model = timm.create_model(name, **options)
        model.weights_record = WeightsRecord("random", name)
        return model
    cached = cache_file(name)
    if cached.is_file():
        model = timm.create_model(name, **options)
        load_weights(model, cached, what="the weights cache's file")
        model.weights_record = WeightsRecord("cache", name, str(cached), sha256_of(cached))
        return model
    hub_file = hf_cached_file(name)
    if hub_file is not None:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": hub_file}, **options)
        model.weights_record = WeightsRecord("hub", name, hub_file, sha256_of(Path(hub_file)))
        return model
    if not hub_reachable():
        raise UserInputError(
            f"backbone.pretrained=true but the weights of {name} are in neither the weights cache "
            f"({cached.parent}) nor the Hugging Face cache, and the model hub cannot be "
            "reached; run `genie-dg fetch-weights` where there is a network, set "
            "backbone.weights=/path/to/weights.safetensors, or backbone.pretrained=false"
        )
    model = timm.create_model(name, pretrained=True, **options)
    downloaded = hf_cached_file(name)
    model.weights_record = WeightsRecord("hub", name, downloaded, downloaded and sha256_of(Path(downloaded)))
    return model


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
