"""The parts of a timm ResNet featurizer that MixStyle, ARM and MIRO reach into."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from timm.models.resnet import ResNet
from torch import nn

from genie_dg.errors import UserInputError

RESIDUAL_STAGES = ("layer1", "layer2", "layer3", "layer4")


def backbone_name(featurizer: nn.Module) -> str:
    """The timm architecture name of ``featurizer`` (its class name if timm does not say)."""
    cfg = getattr(featurizer, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(featurizer).__name__


def require_resnet(featurizer: nn.Module, method: str) -> ResNet:
    """``featurizer`` itself, or a ``UserInputError`` naming the backbone when it is no timm ResNet."""
    if not isinstance(featurizer, ResNet):
        raise UserInputError(
            f"{method} needs a timm ResNet featurizer (stem conv1..maxpool, stages layer1..layer4) "
            f"but backbone {backbone_name(featurizer)!r} is a {type(featurizer).__name__}; use a "
            "ResNet backbone (e.g. backbone=resnet18_narrow or backbone=resnet50) or another algorithm"
        )
    return featurizer


def stem_and_stages(featurizer: nn.Module, method: str) -> list[nn.Module]:
    """The stem's last module (``maxpool``) and the four residual stages, in forward order.

    Their outputs are the intermediate features MIRO regularises (its ``stem_block`` layers).
    """
    resnet = require_resnet(featurizer, method)
    return [resnet.maxpool, *(getattr(resnet, name) for name in RESIDUAL_STAGES)]


def first_conv_in_channels(featurizer: nn.Module, method: str) -> int:
    return _first_conv(require_resnet(featurizer, method))[1].in_channels


def widen_first_conv(featurizer: nn.Module, extra_channels: int, method: str) -> None:
    """Give the stem's first convolution ``extra_channels`` more input channels.

    The original channels keep their weights; new channel ``c`` starts from the weights of
    original channel ``c mod in_channels``, as DomainBed's ResNet fills the channels it adds to
    the ImageNet convolution.
    """
    resnet = require_resnet(featurizer, method)
    (parent, name), conv = _first_conv(resnet)
    widened = nn.Conv2d(
        conv.in_channels + extra_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        source = torch.arange(widened.in_channels, device=conv.weight.device) % conv.in_channels
        widened.weight.copy_(conv.weight[:, source])
        if conv.bias is not None:
            widened.bias.copy_(conv.bias)
    widened.weight.requires_grad_(conv.weight.requires_grad)
    setattr(parent, name, widened)


def _first_conv(resnet: ResNet) -> tuple[tuple[nn.Module, str], nn.Conv2d]:
    # Deep-stem variants (resnet*d, resnet*s) make conv1 a Sequential of convolutions.
    if isinstance(resnet.conv1, nn.Sequential):
        return (resnet.conv1, "0"), resnet.conv1[0]
    return (resnet, "conv1"), resnet.conv1


@contextmanager
def captured_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, the last forward output of each of ``modules`` (``None`` until it runs)."""
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def keeper(index: int):
        def keep(module: nn.Module, args: object, output: torch.Tensor) -> None:
            outputs[index] = output

        return keep

    handles = [m.register_forward_hook(keeper(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
