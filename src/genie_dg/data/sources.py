"""The catalogue of DomainBed's image datasets: where each one's files come from and how the
extracted archives become DomainBed's ``<domain>/<class>/<image>`` folder.

:mod:`genie_dg.data.download` fetches, checks and extracts the files (the transport); this module
only says what to fetch and arranges what was extracted.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rich.console import Console

from genie_dg.errors import UserInputError

# What DomainBed's download script keeps of the Caltech Camera Traps: four locations, ten classes.
TERRA_LOCATIONS = ("38", "46", "100", "43")
TERRA_CATEGORIES = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel")


class DownloadError(UserInputError):
    """A file could not be fetched or did not match its checksum."""


class UnsafeArchiveError(UserInputError):
    """An archive member would be written outside the target folder, or is a link or device."""


@dataclass(frozen=True)
class RemoteFile:
    """One file a dataset needs; ``sha256`` is None where no checksum is published."""

    url: str
    filename: str
    sha256: str | None = None
    is_archive: bool = True


# Turns the staging folder (archives extracted) into the dataset folder and returns it.
Installer = Callable[[Path, dict[str, Path], Console], Path]


@dataclass(frozen=True)
class DatasetSource:
    folder: str
    files: tuple[RemoteFile, ...]
    install: Installer
    origin: str


def google_drive(file_id: str) -> str:
    """Direct download of a public Google Drive file (DomainBed's links go through gdown)."""
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


def extracted_folder(name: str) -> Installer:
    """The dataset is the folder ``name`` inside the archive (moved and renamed as DomainBed does)."""

    def install(staging: Path, files: dict[str, Path], console: Console) -> Path:
        folder = staging / name
        if not folder.is_dir():
            found = sorted(p.name for p in staging.iterdir())
            raise DownloadError(f"the archive holds no folder '{name}' (it holds {found}); is it the right file?")
        return folder

    return install


def relative_inside(text: str, what: str) -> PurePosixPath:
    """``text`` as a relative path that cannot leave the folder it is joined to."""
    path = PurePosixPath(text.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchiveError(f"{what} '{text}' points outside the dataset folder; refusing it")
    return path


def build_domain_net(staging: Path, files: dict[str, Path], console: Console) -> Path:
    """Gather the six extracted domain folders and delete DomainBed's list of duplicate images."""
    out = staging / "domain_net"
    out.mkdir()
    for folder in sorted(p for p in staging.iterdir() if p.is_dir() and p != out):
        folder.rename(out / folder.name)
    removed = 0
    for line in files["domain_net_duplicates.txt"].read_text().splitlines():
        if line.strip():
            duplicate = out / relative_inside(line.strip(), "duplicate list entry")
            if duplicate.is_file():
                duplicate.unlink()
                removed += 1
    console.print(f"domain_net: removed {removed} duplicate images (DomainBed's list)")
    return out


def build_terra_incognita(staging: Path, files: dict[str, Path], console: Console) -> Path:
    """Sort the camera-trap images into ``location_<id>/<class>/`` from the annotations."""
    images = staging / "eccv_18_all_images_sm"
    annotation_files = sorted((staging / "eccv_18_annotation_files").glob("*.json"))
    if not images.is_dir() or not annotation_files:
        raise DownloadError(
            "the TerraIncognita archives hold no eccv_18_all_images_sm/ or "
            "eccv_18_annotation_files/*.json; are they the right files?"
        )
    categories: dict[int, str] = {}
    image_records: dict[str, dict] = {}
    labels: dict[str, set[str]] = defaultdict(set)
    for annotation_file in annotation_files:
        data = json.loads(annotation_file.read_text())
        categories.update({c["id"]: c["name"] for c in data.get("categories", [])})
        image_records.update({image["id"]: image for image in data.get("images", [])})
        for annotation in data.get("annotations", []):
            labels[annotation["image_id"]].add(annotation["category_id"])
    out = staging / "terra_incognita"
    copied, missing = 0, 0
    for image_id, image in image_records.items():
        location = str(image["location"])
        if location not in TERRA_LOCATIONS:
            continue
        name = relative_inside(image["file_name"], "annotated image")
        source = images / name
        for category in sorted({categories.get(c) for c in labels[image_id]} & set(TERRA_CATEGORIES)):
            if not source.is_file():
                missing += 1
                break
            destination = out / f"location_{location}" / category / name.name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
            copied += 1
    if not copied:
        raise DownloadError("no annotated image of locations 38, 46, 100, 43 was found in the archives")
    console.print(f"terra_incognita: sorted {copied} images into {len(TERRA_LOCATIONS)} locations")
    if missing:
        console.print(f"[yellow]terra_incognita: {missing} annotated images are not in the image archive (left out)")
    return out


SOURCES: dict[str, DatasetSource] = {
    "pacs": DatasetSource(
        folder="PACS",
        files=(RemoteFile(google_drive("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"), "PACS.zip"),),
        install=extracted_folder("kfold"),
        origin="http://www.eecs.qmul.ac.uk/~dl307/project_iccv2017 (DomainBed's Google Drive copy)",
    ),
    "vlcs": DatasetSource(
        folder="VLCS",
        files=(RemoteFile(google_drive("1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"), "VLCS.tar.gz"),),
        install=extracted_folder("VLCS"),
        origin="http://www.eecs.qmul.ac.uk/~dl307/project_iccv2017 (DomainBed's Google Drive copy)",
    ),
    "office_home": DatasetSource(
        folder="office_home",
        files=(RemoteFile(google_drive("1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"), "office_home.zip"),),
        install=extracted_folder("OfficeHomeDataset_10072016"),
        origin="http://hemanthdv.org/OfficeHome-Dataset (DomainBed's Google Drive copy)",
    ),
    "domain_net": DatasetSource(
        folder="domain_net",
        # sha256 of the six archives as pinned by TensorFlow Datasets for these same URLs
        # (tensorflow/datasets tensorflow_datasets/image_classification/domainnet/checksums.tsv); their sizes
        # (1,270,909,081 ... 6,062,039,589 bytes) match the md5-checked copies in datasets-mila/datasets--domainnet.
        files=(
            RemoteFile(
                "http://csr.bu.edu/ftp/visda/2019/multi-source/groundtruth/clipart.zip",
                "clipart.zip",
                "f8f248a3e8bbc9868c523ae24e6601b4c2ad102afc60c0efeb4f3255df22354d",
            ),
            RemoteFile(
                "http://csr.bu.edu/ftp/visda/2019/multi-source/infograph.zip",
                "infograph.zip",
                "891e14f476317e97b6f06d6498c11d0a5b8d0c8b57210765ed9beb072da611fa",
            ),
            RemoteFile(
                "http://csr.bu.edu/ftp/visda/2019/multi-source/groundtruth/painting.zip",
                "painting.zip",
                "fa47e6d405503ea0286cabd767f176bd30e988b63ddd7b9db16cf030c9770015",
            ),
            RemoteFile(
                "http://csr.bu.edu/ftp/visda/2019/multi-source/quickdraw.zip",
                "quickdraw.zip",
                "9f37df2a8c3733703dbb35ad9964202a65f675ca30137756457537536b485d84",
            ),
            RemoteFile(
                "http://csr.bu.edu/ftp/visda/2019/multi-source/real.zip",
                "real.zip",
                "d7fe010b430c5b510f85d657d38c4a1924822695fabea4fef57bd00dba251d63",
            ),
            RemoteFile(
                "http://csr.bu.edu/ftp/visda/2019/multi-source/sketch.zip",
                "sketch.zip",
                "23a7dbae7016b343e934399beaa8a68728fb5e570ebe2c71df9b75cf91c499fc",
            ),
            RemoteFile(
                "https://raw.githubusercontent.com/facebookresearch/DomainBed/main/domainbed/misc/domain_net_duplicates.txt",
                "domain_net_duplicates.txt",
                is_archive=False,
            ),
        ),
        install=build_domain_net,
        origin="http://ai.bu.edu/M3SDA",
    ),
    "terra_incognita": DatasetSource(
        folder="terra_incognita",
        files=(
            RemoteFile(
                "https://storage.googleapis.com/public-datasets-lila/caltechcameratraps/eccv_18_all_images_sm.tar.gz",
                "eccv_18_all_images_sm.tar.gz",
            ),
            RemoteFile(
                "https://storage.googleapis.com/public-datasets-lila/caltechcameratraps/eccv_18_annotations.tar.gz",
                "eccv_18_annotations.tar.gz",
            ),
        ),
        install=build_terra_incognita,
        origin="https://lila.science/datasets/caltech-camera-traps",
    ),
}
