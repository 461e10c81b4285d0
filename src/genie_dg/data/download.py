"""Fetch DomainBed's image datasets from the sources DomainBed uses, into DomainBed's layout.

``genie-dg download pacs --data-dir D`` (or ``python -m genie_dg.data.download pacs --data-dir D``)
downloads the archives into ``D/.downloads/`` (resuming a partial download with an HTTP Range
request), checks their sha256, extracts them into a staging folder there (refusing members that
would land outside it and links of any kind), arranges the dataset (DomainNet's duplicate
removal, TerraIncognita's build from its annotations: :mod:`genie_dg.data.sources`, the catalogue)
and only then moves it to ``D/<folder>``: an interrupted or refused download leaves no half-built
dataset and nothing outside ``D``, and a refused archive is deleted so that it is never reused.
``--mirror`` takes the same files from a local folder or another URL.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import stat
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from genie_dg.data.sources import (  # noqa: F401 (the catalogue, re-exported for callers)
    SOURCES,
    TERRA_CATEGORIES,
    TERRA_LOCATIONS,
    DownloadError,
    RemoteFile,
    UnsafeArchiveError,
    relative_inside,
)
from genie_dg.errors import UserInputError

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60
DOWNLOADS_FOLDER = ".downloads"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str | None, console: Console) -> None:
    """Compare with the pinned checksum; a mismatching file is deleted so a rerun fetches it anew."""
    actual = file_sha256(path)
    if expected is None:
        console.print(
            f"{path.name}: sha256 {actual} (no checksum is published for it; pin one with --sha256 {path.name}=<hex>)",
            highlight=False,
        )
    elif actual != expected.lower():
        path.unlink()
        raise DownloadError(
            f"{path.name}: sha256 is {actual}, expected {expected.lower()}; the file was deleted, "
            "run the command again to download it anew (or check the --mirror / --sha256 given)"
        )


def _local_path(location: str) -> Path | None:
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    return Path(location)


@contextlib.contextmanager
def open_source(location: str, offset: int) -> Iterator[tuple[BinaryIO, int | None, int]]:
    """Yield ``(stream, total size or None, offset the stream starts at)``.

    The start is ``offset`` when the source can resume there (a local file, or a server that
    answers the Range request with 206), else 0 and the caller starts over.
    """
    local = _local_path(location)
    if local is not None:
        if not local.is_file():
            raise DownloadError(f"{local} does not exist (looked for it as a local file)")
        size = local.stat().st_size
        start = offset if offset <= size else 0
        with local.open("rb") as f:
            f.seek(start)
            yield f, size, start
        return
    headers = {"User-Agent": "genie-dg"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(location, headers=headers), timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Nothing left past the offset: the partial file is already whole.
            with open(os.devnull, "rb") as nothing:
                yield nothing, offset, offset
            return
        raise DownloadError(f"{location}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"could not reach {location} ({err}); check the network and run again") from err
    with response:
        if response.headers.get_content_type() == "text/html":
            raise DownloadError(
                f"{location} answered with a web page instead of the file (a download quota or a "
                "moved file); fetch it in a browser, put it in a folder and pass --mirror FOLDER"
            )
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            total = content_range.rpartition("/")[2]
            yield response, int(total) if total.isdigit() else None, offset
        else:
            length = response.headers.get("Content-Length")
            yield response, int(length) if length and length.isdigit() else None, 0


def fetch(location: str, dest: Path, sha256: str | None, progress: Progress, console: Console) -> Path:
    """Download ``location`` to ``dest``, resuming ``dest.part`` when there is one."""
    if dest.exists():
        check_sha256(dest, sha256, console)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    offset = partial.stat().st_size if partial.exists() else 0
    try:
        with open_source(location, offset) as (stream, total, start):
            task = progress.add_task(dest.name, total=total, completed=start)
            with partial.open("ab" if start else "wb") as out:
                while chunk := stream.read(CHUNK_BYTES):
                    out.write(chunk)
                    progress.advance(task, len(chunk))
    except (OSError, urllib.error.URLError) as err:
        kept = partial.stat().st_size if partial.exists() else 0
        raise DownloadError(
            f"downloading {location} stopped ({err}); run the same command again to resume from "
            f"the {kept} bytes kept in {partial}"
        ) from err
    partial.rename(dest)
    check_sha256(dest, sha256, console)
    return dest


def _member_path(target: Path, name: str, archive: Path) -> Path:
    try:
        relative = relative_inside(name, f"{archive.name}: member")
    except UnsafeArchiveError as err:
        raise UnsafeArchiveError(f"{err}; nothing was installed") from None
    path = (target / relative).resolve()
    if not path.is_relative_to(target):
        raise UnsafeArchiveError(f"{archive.name}: member '{name}' resolves outside {target}; nothing was installed")
    return path


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip or tar archive into ``target``, refusing escaping members, links and devices."""
    target = target.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            # The central directory lists every member up front: check all before writing any.
            for member in members:
                _member_path(target, member.filename, archive)
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise UnsafeArchiveError(
                        f"{archive.name}: member '{member.filename}' is a symbolic link; links are "
                        "refused, nothing was installed"
                    )
            zf.extractall(target, members)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            # Streamed (a .tar.gz has no index); a refused member aborts the whole install.
            for member in tf:
                _member_path(target, member.name, archive)
                if member.issym() or member.islnk():
                    raise UnsafeArchiveError(
                        f"{archive.name}: member '{member.name}' is a link to '{member.linkname}'; "
                        "links are refused, nothing was installed"
                    )
                if not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(
                        f"{archive.name}: member '{member.name}' is a device or pipe; only files and "
                        "folders are extracted, nothing was installed"
                    )
                tf.extract(member, target, filter="data")
    else:
        raise DownloadError(f"{archive} is neither a zip nor a tar archive; delete it and download again")


def file_location(file: RemoteFile, mirror: str | None) -> str:
    """Where to fetch ``file``: its origin, or the same name under ``mirror`` (a folder or URL)."""
    if mirror is None:
        return file.url
    if "://" in mirror:
        return f"{mirror.rstrip('/')}/{urllib.parse.quote(file.filename)}"
    return str(Path(mirror).expanduser() / file.filename)


def download_dataset(
    name: str,
    data_dir: Path,
    mirror: str | None = None,
    sha256: dict[str, str] | None = None,
    keep_archives: bool = False,
    console: Console | None = None,
) -> Path:
    """Download, check, extract and arrange dataset ``name`` into ``data_dir``; return its folder."""
    console = console or Console(stderr=True)
    if name not in SOURCES:
        raise UserInputError(f"no download for '{name}'; choose one of {', '.join(SOURCES)}")
    source = SOURCES[name]
    pinned = {f.filename: f.sha256 for f in source.files} | (sha256 or {})
    unknown = sorted(set(pinned) - {f.filename for f in source.files})
    if unknown:
        raise UserInputError(
            f"--sha256 names {unknown}, which {name} does not use ({[f.filename for f in source.files]})"
        )
    data_dir = data_dir.expanduser().resolve()
    target = data_dir / source.folder
    if target.is_dir() and any(target.iterdir()):
        console.print(f"{name}: {target} already exists; delete it to download again", highlight=False)
        return target
    downloads = data_dir / DOWNLOADS_FOLDER
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    console.print(f"{name}: from {source.origin}", highlight=False)
    with Progress(*columns, console=console) as progress:
        files = {
            f.filename: fetch(file_location(f, mirror), downloads / f.filename, pinned[f.filename], progress, console)
            for f in source.files
        }
    staging = downloads / f"{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for file in source.files:
            if file.is_archive:
                console.print(f"extracting {file.filename}", highlight=False)
                safe_extract(files[file.filename], staging)
        built = source.install(staging, files, console)
        if target.is_dir():
            target.rmdir()
        built.rename(target)
    except UserInputError as err:
        # A refused file is never used again (a rerun, with another --mirror too, fetches anew).
        for path in files.values():
            path.unlink(missing_ok=True)
        raise type(err)(f"{err}; deleted {', '.join(sorted(files))} so that the next attempt downloads anew") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_archives:
        for path in files.values():
            path.unlink()
    console.print(
        f"{name}: ready in {target}; check it with `genie-dg verify-data {name} --data-dir {data_dir}`", highlight=False
    )
    return target


def default_data_dir() -> Path:
    """``$DATA_DIR``, else ``./data``: where ``paths.data_dir`` points by default."""
    return Path(os.environ.get("DATA_DIR", "data"))


def _sha256_pin(text: str) -> tuple[str, str]:
    filename, sep, digest = text.partition("=")
    if not sep or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
        raise argparse.ArgumentTypeError(f"'{text}' is not FILENAME=<64 hex digits>")
    return filename, digest.lower()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=sorted(SOURCES), help="which DomainBed dataset")
    parser.add_argument(
        "--data-dir", type=Path, default=default_data_dir(), help="parent folder (default: $DATA_DIR or ./data)"
    )
    parser.add_argument("--mirror", help="take the files (same names) from this folder or URL instead of the origin")
    parser.add_argument(
        "--sha256",
        type=_sha256_pin,
        action="append",
        default=[],
        metavar="FILENAME=HEX",
        help="expected sha256 of a downloaded file (repeatable)",
    )
    parser.add_argument(
        "--keep-archives", action="store_true", help=f"keep the archives in <data-dir>/{DOWNLOADS_FOLDER}"
    )


def run(args: argparse.Namespace) -> int:
    download_dataset(args.dataset, args.data_dir, args.mirror, dict(args.sha256), args.keep_archives)
    return 0


if __name__ == "__main__":
    from genie_dg.cli import main

    sys.exit(main(["download", *sys.argv[1:]]))
