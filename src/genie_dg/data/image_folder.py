"""Image datasets in DomainBed's on-disk layout: ``<root>/<domain>/<class>/<image>``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from genie_dg.data.multidomain import MultiDomainDataset
from genie_dg.errors import UserInputError

log = logging.getLogger(__name__)

# torchvision's ImageFolder suffixes (what DomainBed reads) plus GIF.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How many ignored paths one warning spells out before summarising the rest as a count.
LISTED_IN_WARNING = 20


class CorruptImageError(UserInputError):
    """An image file that PIL cannot decode (corrupt, truncated, or not an image at all)."""

    def __init__(self, message: str) -> None:
        # Raised in a DataLoader worker, it reaches the main process rebuilt from the worker's
        # whole traceback text (torch's ExceptionWrapper): keep the original one-line message,
        # the traceback's last line.
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition(": ")[2] or message
        super().__init__(message)


def read_rgb(path: Path) -> Image.Image:
    """Decode ``path`` fully as an RGB image; a file that does not decode raises naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(
            f"{path}: cannot decode this image ({err}); replace or delete the file, or set "
            "dataset.dataset.skip_corrupt=true to skip unreadable images"
        ) from err


class ImageFiles(Dataset):
    """``(path, label)`` pairs read as RGB PIL images."""

    def __init__(self, samples: Sequence[tuple[Path, int]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return read_rgb(path), label


@dataclass
class ImageTree:
    """What a scan of ``root/<domain>/<class>/`` found.

    ``files[domain][class]`` lists the image files of each class folder (sorted, searched
    recursively as torchvision's ImageFolder does); ``ignored`` holds the paths (relative to
    ``root``) that are neither domain folders, class folders nor images.
    """

    root: Path
    domains: list[str]
    classes: list[str]
    files: dict[str, dict[str, list[Path]]]
    ignored: list[str] = field(default_factory=list)
    skipped_links: list[str] = field(default_factory=list)

    def count(self, domain: str, cls: str | None = None) -> int:
        per_class = self.files[domain]
        return len(per_class.get(cls, [])) if cls is not None else sum(map(len, per_class.values()))

    def warn_ignored(self, name: str) -> None:
        """One warning that lists what the scan left out, so a stray file is never silent (and
        one for the symbolic links it did not follow)."""
        if self.skipped_links:
            more = len(self.skipped_links) - LISTED_IN_WARNING
            log.warning(
                "%s: did not follow %d symbolic link(s) in %s: %s%s",
                name,
                len(self.skipped_links),
                self.root,
                "; ".join(self.skipped_links[:LISTED_IN_WARNING]),
                f"; and {more} more" if more > 0 else "",
            )
        if not self.ignored:
            return
        shown = ", ".join(self.ignored[:LISTED_IN_WARNING])
        more = len(self.ignored) - LISTED_IN_WARNING
        log.warning(
            "%s: ignored %d path(s) in %s that are not <domain>/<class>/<image> (hidden, non-image or empty): %s%s",
            name,
            len(self.ignored),
            self.root,
            shown,
            f", and {more} more" if more > 0 else "",
        )


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def unfollowed_link(path: Path, root: Path) -> str | None:
    """Why the scan does not follow ``path``, a symbolic link, or None where it does (a link to a
    file inside the dataset root). The policy: never leave the root (``root``, resolved), never
    read a folder twice (every folder inside the root is read where it is), so a link can
    neither add images from elsewhere nor loop; each skipped link is named in a warning."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return f"{path.relative_to(root)} (broken or looping link)"
    if not target.is_relative_to(root.resolve()):
        return f"{path.relative_to(root)} -> {target} (outside the dataset root)"
    if target.is_dir():
        return f"{path.relative_to(root)} -> {target.relative_to(root.resolve())} (a folder read where it is)"
    return None


def _class_images(class_dir: Path, root: Path, ignored: list[str], skipped_links: list[str]) -> list[Path]:
    images = []
    # followlinks=False: a linked folder is listed, not entered (see unfollowed_link).
    for parent, dirnames, filenames in os.walk(class_dir, followlinks=False):
        parent_path = Path(parent)
        links = sorted(d for d in dirnames if (parent_path / d).is_symlink())
        skipped_links.extend(why for d in links if (why := unfollowed_link(parent_path / d, root)))
        hidden = sorted(d for d in dirnames if _is_hidden(d) and d not in links)
        ignored.extend(str((parent_path / d).relative_to(root)) + "/" for d in hidden)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d) and d not in links)
        for filename in sorted(filenames):
            path = parent_path / filename
            if path.is_symlink() and (why := unfollowed_link(path, root)):
                skipped_links.append(why)
            elif _is_hidden(filename) or path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored.append(str(path.relative_to(root)))
            else:
                images.append(path)
    return images


def _domain_folders(
    root: Path, name: str, domains: Sequence[str] | None, ignored: list[str], skipped_links: list[str]
) -> list[str]:
    """The domain folders of ``root``: the configured ``domains`` (each must exist) or, with
    None, every visible folder; other entries go to ``ignored`` and ``skipped_links``."""
    folders = []
    for entry in sorted(root.iterdir()):
        if entry.is_symlink() and (why := unfollowed_link(entry, root)):
            skipped_links.append(why)
        elif entry.is_dir() and not _is_hidden(entry.name):
            folders.append(entry.name)
        else:
            ignored.append(entry.name + ("/" if entry.is_dir() else ""))
    if domains is None:
        domain_names = folders
    else:
        domain_names = list(domains)
        missing = [d for d in domain_names if d not in folders]
        if missing:
            unexpected = [f for f in folders if f not in domain_names]
            raise UserInputError(
                f"{name}: domain folder(s) {missing} not found in {root} (found {folders}; "
                f"not in the config: {unexpected}); the dataset config expects {domain_names}"
            )
        ignored.extend(f + "/" for f in folders if f not in domain_names)
    if not domain_names:
        raise UserInputError(f"{name}: {root} holds no domain folders (<domain>/<class>/<image>)")
    return domain_names


def scan_image_tree(
    root: str | Path,
    name: str,
    domains: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    class_aliases: Mapping[str, Mapping[str, str]] | None = None,
) -> ImageTree:
    """List the images of ``root/<domain>/<class>/`` and check the layout against a config.

    ``domains`` and ``classes`` (a dataset config lists them) fix names and order; ``None``
    discovers them: every visible sub-folder is a domain, and the classes are the sorted union
    of the class folders that hold an image. ``class_aliases[domain][folder]`` names the class of
    a folder that a domain names its own way (VLCS's ``auto`` for ``car``...). A configured domain
    that is missing, a domain without images, a class folder outside the configured classes, or
    discovered classes that some domain shares with no other (the domains name their classes
    differently: the label set would be wrong) is a :class:`UserInputError`; hidden and non-image
    entries are collected in ``ignored``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserInputError(
            f"{name}: data directory {root} does not exist; put the dataset there in DomainBed's "
            "layout (<domain>/<class>/<image>), download it with `genie-dg download`, or point "
            "paths.data_dir (or $DATA_DIR) at its parent"
        )
    ignored: list[str] = []
    skipped_links: list[str] = []
    domain_names = _domain_folders(root, name, domains, ignored, skipped_links)
    aliases = _checked_aliases(root, name, domain_names, class_aliases)
    files: dict[str, dict[str, list[Path]]] = {}
    for domain in domain_names:
        per_class: dict[str, list[Path]] = {}
        for entry in sorted((root / domain).iterdir()):
            if entry.is_symlink() and (why := unfollowed_link(entry, root)):
                skipped_links.append(why)
            elif entry.is_dir() and not _is_hidden(entry.name):
                cls = aliases.get(domain, {}).get(entry.name, entry.name)
                per_class.setdefault(cls, []).extend(_class_images(entry, root, ignored, skipped_links))
            else:
                ignored.append(f"{domain}/{entry.name}" + ("/" if entry.is_dir() else ""))
        if classes is not None:
            unknown = sorted(set(per_class) - set(classes))
            if unknown:
                raise UserInputError(
                    f"{name}: class folder(s) {unknown} in {root / domain} are not among the "
                    f"{len(classes)} classes of the dataset config ({', '.join(classes)}); where a domain "
                    f"names a class its own way, map it: dataset.dataset.class_aliases="
                    f"{{{domain}: {{{unknown[0]}: <class>}}}}"
                )
        if not any(per_class.values()):
            raise UserInputError(
                f"{name}: domain '{domain}' ({root / domain}) contains no images; expected "
                "<class>/<image> folders inside it"
            )
        files[domain] = per_class

    if classes is not None:
        class_names = list(classes)
    else:
        class_names = sorted({c for per_class in files.values() for c, images in per_class.items() if images})
    for domain, per_class in files.items():
        ignored.extend(f"{domain}/{c}/" for c, images in per_class.items() if not images and c not in class_names)
    tree = ImageTree(root, domain_names, class_names, files, ignored, skipped_links)
    if classes is None:
        _refuse_disjoint_label_sets(tree, name)
    return tree


def _checked_aliases(
    root: Path, name: str, domains: Sequence[str], class_aliases: Mapping[str, Mapping[str, str]] | None
) -> dict[str, dict[str, str]]:
    """``class_aliases`` as plain dicts, every domain and folder it names checked to exist."""
    aliases = {str(d): {str(f): str(c) for f, c in (m or {}).items()} for d, m in (class_aliases or {}).items()}
    for domain, folders in aliases.items():
        if domain not in domains:
            raise UserInputError(
                f"{name}: dataset.dataset.class_aliases names domain '{domain}', which is not one of {list(domains)}"
            )
        missing = sorted(f for f in folders if not (root / domain / f).is_dir())
        if missing:
            raise UserInputError(
                f"{name}: dataset.dataset.class_aliases maps folder(s) {missing} that {root / domain} does not hold"
            )
    return aliases


def _refuse_disjoint_label_sets(tree: ImageTree, name: str) -> None:
    """Discovered classes: a domain that shares no class with any other names its classes its own
    way, and training would silently learn a wrong label set; refuse it."""
    present = {d: {c for c, images in tree.files[d].items() if images} for d in tree.domains}
    if len(tree.domains) < 2:
        return
    alone = [d for d in tree.domains if not present[d] & set().union(*(present[o] for o in tree.domains if o != d))]
    if alone:
        shown = "; ".join(f"{d}: {', '.join(sorted(present[d]))}" for d in alone)
        raise UserInputError(
            f"{name}: domain(s) {alone} share no class folder with any other domain ({shown}); the domains "
            "name their classes differently. Map folder names to classes with "
            "dataset.dataset.class_aliases={<domain>: {<folder>: <class>}}, or list dataset.dataset.classes"
        )


def lacking_classes(tree: ImageTree) -> dict[str, list[str]]:
    """The classes each domain has no image of (only domains that lack some)."""
    lacking = {d: [c for c in tree.classes if not tree.files[d].get(c)] for d in tree.domains}
    return {d: missing for d, missing in lacking.items() if missing}


def find_unreadable(paths: Sequence[Path]) -> dict[Path, str]:
    """Decode every file (threads: PIL releases the GIL while decoding); map failures to reasons."""

    def problem(path: Path) -> str | None:
        try:
            read_rgb(path)
        except CorruptImageError as err:
            return str(err.__cause__)
        return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        reasons = list(pool.map(problem, paths))
    return {path: reason for path, reason in zip(paths, reasons) if reason is not None}


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


def expected_total(expected: int | Mapping[str, int]) -> int:
    """A domain's expected image count, given as a total or per class."""
    return expected if isinstance(expected, int) else sum(expected.values())


def domain_image_folder(
    root: str | Path | None,
    name: str | None = None,
    domains: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    expected_counts: Mapping[str, int | Mapping[str, int]] | None = None,
    image_size: int = 224,
    augment: bool = True,
    skip_corrupt: bool = False,
    class_aliases: Mapping[str, Mapping[str, str]] | None = None,
) -> MultiDomainDataset:
    """Read ``root/<domain>/<class>/*`` (see :func:`scan_image_tree`) as a multi-domain dataset.

    ``name`` defaults to the folder's name. ``expected_counts`` (per domain: a total, or
    per-class counts) only warns on a difference; ``genie-dg verify-data`` is the strict check.
    A corrupt image raises :class:`CorruptImageError` when it is read, unless ``skip_corrupt``:
    then every image is decoded once here and the unreadable ones are left out and logged.
    ``class_aliases``: see :func:`scan_image_tree`. The classes a domain lacks are logged.
    """
    if root is None:
        raise UserInputError(
            "dataset.dataset.root is not set: point it at a <domain>/<class>/<image> tree, "
            "e.g. dataset.dataset.root=/path/to/my_dataset"
        )
    name = name or Path(root).name
    tree = scan_image_tree(root, name, domains, classes, class_aliases)
    tree.warn_ignored(name)
    for domain, missing in lacking_classes(tree).items():
        log.warning(
            "%s: domain '%s' has no image of %d of the %d classes: %s",
            name,
            domain,
            len(missing),
            len(tree.classes),
            ", ".join(missing),
        )
    label = {c: i for i, c in enumerate(tree.classes)}
    samples = {
        d: [(f, label[c]) for c, images in tree.files[d].items() if c in label for f in images] for d in tree.domains
    }
    if skip_corrupt:
        unreadable = find_unreadable([f for d in tree.domains for f, _ in samples[d]])
        if unreadable:
            listed = "; ".join(
                f"{p.relative_to(tree.root)} ({why})" for p, why in list(unreadable.items())[:LISTED_IN_WARNING]
            )
            log.warning("%s: skipped %d unreadable image(s) (skip_corrupt=true): %s", name, len(unreadable), listed)
        samples = {d: [(f, y) for f, y in pairs if f not in unreadable] for d, pairs in samples.items()}
        for d, pairs in samples.items():
            if not pairs:
                raise UserInputError(f"{name}: every image of domain '{d}' is unreadable")
    for d, expected in (expected_counts or {}).items():
        if d in samples and len(samples[d]) != expected_total(expected):
            log.warning(
                "%s: domain '%s' has %d images where the dataset config expects %d; "
                "`genie-dg verify-data` lists the differences per class",
                name,
                d,
                len(samples[d]),
                expected_total(expected),
            )
    train_transform, eval_transform = domainbed_transforms(image_size, augment)
    return MultiDomainDataset(
        name=name,
        domain_names=tree.domains,
        classes=tree.classes,
        input_shape=(3, image_size, image_size),
        domains=[ImageFiles(samples[d]) for d in tree.domains],
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
