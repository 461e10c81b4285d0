"""Images/s of the DataModule's training stream against a plain ImageFolder + DataLoader.

Not a test. Builds a PACS-shaped tree (4 domains x 7 classes of 227x227 JPEGs, as PACS ships)
in a temporary folder, or reads ``--root``, and times, with the same transforms (DomainBed's
training augmentation at 224 px), batch and worker count:

- ``datamodule``: ``MultiDomainDataModule.train_dataloader()`` under leave-one-domain-out
  (target ``art_painting``), i.e. balanced batches of ``--batch-size`` images from each of the
  three training domains drawn by one loader;
- ``imagefolder``: one shuffled ``DataLoader`` over the ``ConcatDataset`` of a torchvision
  ``ImageFolder`` per training domain, batches of 3 x ``--batch-size``.

Runs alternate (``--repeats`` each) and the median is reported. While each stream runs, the
live DataLoader worker processes are counted: the DataModule uses ``--workers`` in total
(DomainBed starts 8 per training domain). Example::

    python benchmarks/data_throughput.py --workers 2 --images-per-class 60
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader
from torchvision.datasets import ImageFolder

from genie_dg.data import MultiDomainDataModule, domain_image_folder
from genie_dg.data.image_folder import domainbed_transforms

DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
PACS_SIDE = 227


def write_pacs_like_tree(root: Path, images_per_class: int, seed: int = 0) -> None:
    """Smooth random colour fields (JPEG-compressible like photos, unlike white noise)."""
    rng = np.random.default_rng(seed)
    for domain in DOMAINS:
        for cls in CLASSES:
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(images_per_class):
                coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((PACS_SIDE, PACS_SIDE), Image.Resampling.BICUBIC)
                image.save(folder / f"{i:05d}.jpg", quality=90)


def time_stream(batches: Iterable, warmup: int, timed: int) -> tuple[float, int, int]:
    """(seconds, images, worker processes alive) over ``timed`` batches after ``warmup``."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    workers = len(multiprocessing.active_children())
    images = 0
    start = time.perf_counter()
    for _ in range(timed):
        images += len(next(iterator)[1])
    return time.perf_counter() - start, images, workers


def datamodule_stream(root: Path, batch_size: int, workers: int) -> DataLoader:
    datamodule = MultiDomainDataModule(
        lambda: domain_image_folder(root, "pacs", domains=DOMAINS, classes=CLASSES, image_size=224, augment=True),
        test_domains=["art_painting"],
        batch_size=batch_size,
        num_workers=workers,
    )
    datamodule.setup()
    return datamodule.train_dataloader()


def imagefolder_stream(root: Path, batch_size: int, workers: int) -> Iterator:
    """Endless, epoch after epoch (the persistent workers stay up), like the training stream."""
    train_transform, _ = domainbed_transforms(224, augment=True)
    dataset = ConcatDataset([ImageFolder(str(root / d), transform=train_transform) for d in DOMAINS[1:]])
    loader = DataLoader(
        dataset,
        batch_size=3 * batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an existing PACS-layout tree (default: generate one)")
    parser.add_argument("--images-per-class", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32, help="per training domain")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="batches before timing (worker start-up)")
    parser.add_argument("--batches", type=int, default=15, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "PACS"
            write_pacs_like_tree(root, args.images_per_class)
        streams = {"datamodule": datamodule_stream, "imagefolder": imagefolder_stream}
        rates: dict[str, list[float]] = {name: [] for name in streams}
        alive: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, make in streams.items():
                loader = make(root, args.batch_size, args.workers)
                seconds, images, workers = time_stream(loader, args.warmup, args.batches)
                rates[name].append(images / seconds)
                alive[name] = workers
                del loader
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"batch {args.batch_size} x 3 domains, {args.workers} workers, median of {args.repeats}"
    )
    print(f"{'loader':<12} {'images/s':>10} {'vs imagefolder':>15} {'worker processes':>17}")
    baseline = statistics.median(rates["imagefolder"])
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<12} {rate:>10.1f} {rate / baseline:>14.1%} {alive[name]:>17}")
    print(f"DomainBed would start {8 * 3} worker processes (8 per training domain).")


if __name__ == "__main__":
    main()
