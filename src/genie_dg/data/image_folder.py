"""Image datasets in DomainBed's on-disk layout: ``<root>/<domain>/<class>/<image>``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from genie_dg.data.multidomain import MultiDomainDataset
from genie_dg.errors import UserInputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFiles(Dataset):
    """``(path, label)`` pairs read as RGB PIL images."""

    def __init__(self, samples: Sequence[tuple[Path, int]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        with Image.open(path) as image:
            return image.convert("RGB"), label


def domainbed_transforms(image_size: int, augment: bool) -> tuple[T.Compose, T.Compose]:
    """DomainBed's (train, eval) transforms; augmentation only ever applies to training."""
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    eval_transform = T.Compose([T.Resize((image_size, image_size)), *normalize])
    if not augment:
        return eval_transform, eval_transform
    train_transform = T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.7, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.3),
            T.RandomGrayscale(),
            *normalize,
        ]
    )
    return train_transform, eval_transform


def domain_image_folder(
    data_dir: str | Path,
    name: str,
    subdir: str | None = None,
    domains: Sequence[str] | None = None,
    image_size: int = 224,
    augment: bool = True,
) -> MultiDomainDataset:
    """Read ``data_dir/subdir/<domain>/<class>/*``; classes are the sorted union over domains.

    ``domains`` fixes the names and order (a dataset config lists them); ``None`` discovers
    every sub-folder.
    """
    root = Path(data_dir).expanduser() / (subdir or "")
    if not root.is_dir():
        raise UserInputError(
            f"{name}: data directory {root} does not exist; put the dataset there in DomainBed's "
            "layout (<domain>/<class>/<image>) or point paths.data_dir (or $DATA_DIR) at its parent"
        )
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    domain_names = list(domains) if domains is not None else found
    missing = [d for d in domain_names if d not in found]
    if missing or not domain_names:
        raise UserInputError(
            f"{name}: domain folder(s) {missing or '(none)'} not found in {root} (found: {found}); "
            "check paths.data_dir and the dataset's domain list"
        )
    class_dirs = {d: sorted(p for p in (root / d).iterdir() if p.is_dir()) for d in domain_names}
    classes = sorted({p.name for dirs in class_dirs.values() for p in dirs if not p.name.startswith(".")})
    label = {c: i for i, c in enumerate(classes)}
    per_domain = []
    for d in domain_names:
        samples = [
            (f, label[c.name])
            for c in class_dirs[d]
            if c.name in label
            for f in sorted(c.iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        ]
        if not samples:
            raise UserInputError(f"{name}: domain '{d}' ({root / d}) contains no images")
        per_domain.append(ImageFiles(samples))
    train_transform, eval_transform = domainbed_transforms(image_size, augment)
    return MultiDomainDataset(
        name=name,
        domain_names=domain_names,
        classes=classes,
        input_shape=(3, image_size, image_size),
        domains=per_domain,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
