"""`genie-dg download`, offline: archives built here, served from a folder, file:// or local HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import Progress

from genie_dg.cli import main
from genie_dg.conf import CONFIG_DIR
from genie_dg.data.download import (
    SOURCES,
    TERRA_CATEGORIES,
    TERRA_LOCATIONS,
    UnsafeArchiveError,
    fetch,
    safe_extract,
)

from helpers.trees import PACS_DOMAINS, image_bytes

ROOT = Path(__file__).resolve().parents[2]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _pacs_zip(path: Path) -> Path:
    png = image_bytes(90)
    members = {f"kfold/{d}/{c}/{i}.png": png for d in PACS_DOMAINS for c in ("dog", "horse") for i in range(2)}
    return _zip(path, members)


def test_download_installs_domainbed_layout_from_a_mirror_folder(tmp_path, capsys):
    archive = _pacs_zip(tmp_path / "mirror" / "PACS.zip")
    data_dir = tmp_path / "data"
    status = main(
        [
            "download",
            "pacs",
            "--data-dir",
            str(data_dir),
            "--mirror",
            str(archive.parent),
            "--sha256",
            f"PACS.zip={_sha256(archive)}",
        ]
    )
    assert status == 0
    assert sorted(p.name for p in (data_dir / "PACS").iterdir()) == PACS_DOMAINS
    assert len(list((data_dir / "PACS").rglob("*.png"))) == 16
    assert list((data_dir / ".downloads").iterdir()) == [], "archive and staging are cleaned up"
    assert "genie-dg verify-data pacs" in capsys.readouterr().err


def test_download_from_a_file_url_keeps_the_archive_when_asked(tmp_path):
    archive = _pacs_zip(tmp_path / "mirror" / "PACS.zip")
    data_dir = tmp_path / "data"
    status = main(
        ["download", "pacs", "--data-dir", str(data_dir), "--mirror", archive.parent.as_uri(), "--keep-archives"]
    )
    assert status == 0
    assert (data_dir / "PACS" / "photo" / "dog" / "0.png").is_file()
    assert _sha256(data_dir / ".downloads" / "PACS.zip") == _sha256(archive)


def test_a_sha256_mismatch_deletes_the_file_and_installs_nothing(tmp_path, capsys):
    archive = _pacs_zip(tmp_path / "mirror" / "PACS.zip")
    data_dir = tmp_path / "data"
    status = main(
        [
            "download",
            "pacs",
            "--data-dir",
            str(data_dir),
            "--mirror",
            str(archive.parent),
            "--sha256",
            "PACS.zip=" + "0" * 64,
        ]
    )
    assert status == 2
    assert f"sha256 is {_sha256(archive)}, expected {'0' * 64}" in capsys.readouterr().err
    assert not (data_dir / "PACS").exists()
    assert not (data_dir / ".downloads" / "PACS.zip").exists()


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves ``payload``; honours ``Range: bytes=N-`` unless ``supports_range`` is False."""

    payload = b""
    supports_range = True
    ranges: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        requested = self.headers.get("Range")
        type(self).ranges.append(requested)
        start = int(requested.removeprefix("bytes=").rstrip("-")) if requested and self.supports_range else 0
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, type[_RangeHandler]]]:
    handler = type("Handler", (_RangeHandler,), {"ranges": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/PACS.zip", handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("supports_range", [True, False])
def test_a_partial_download_resumes_with_an_http_range_request(tmp_path, http_server, supports_range):
    url, handler = http_server
    payload = bytes(range(256)) * 40_000
    handler.payload, handler.supports_range = payload, supports_range
    dest = tmp_path / "PACS.zip"
    dest.with_name("PACS.zip.part").write_bytes(payload[:1_000_003])
    console = Console(file=io.StringIO())
    with Progress(console=console) as progress:
        fetch(url, dest, hashlib.sha256(payload).hexdigest(), progress, console)
    assert handler.ranges == ["bytes=1000003-"]
    assert dest.read_bytes() == payload, "a server without Range support restarts from byte 0"
    assert not dest.with_name("PACS.zip.part").exists()


def test_a_partial_local_copy_resumes_where_it_stopped(tmp_path):
    source = tmp_path / "src" / "big.bin"
    source.parent.mkdir()
    source.write_bytes(b"abc" * 100_000)
    dest = tmp_path / "big.bin"
    dest.with_name("big.bin.part").write_bytes(b"abc" * 50_000)
    console = Console(file=io.StringIO())
    with Progress(console=console) as progress:
        fetch(source.as_uri(), dest, _sha256(source), progress, console)
    assert dest.read_bytes() == source.read_bytes()


def _symlink_tar(path: Path, hard: bool) -> Path:
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("kfold/photo/dog/link.png")
        info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    return path


def _symlink_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("kfold/photo/dog/link.png")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda p: _zip(p / "PACS.zip", {"kfold/photo/dog/0.png": b"x", "../escaped.txt": b"pwned"}),
            "'../escaped.txt' points outside",
        ),
        (
            lambda p: _tar_gz(p / "PACS.zip", {"kfold/a.png": b"x", "kfold/../../escaped.txt": b"pwned"}),
            "points outside",
        ),
        (lambda p: _tar_gz(p / "PACS.zip", {str(p.parent / "escaped.txt"): b"pwned"}), "points outside"),
        (lambda p: _symlink_tar(p / "PACS.zip", hard=False), "is a link to '/etc/passwd'; links are refused"),
        (lambda p: _symlink_tar(p / "PACS.zip", hard=True), "is a link to '/etc/passwd'; links are refused"),
        (lambda p: _symlink_zip(p / "PACS.zip"), "is a symbolic link; links are refused"),
    ],
    ids=["zip-dotdot", "tar-dotdot", "tar-absolute", "tar-symlink", "tar-hardlink", "zip-symlink"],
)
def test_a_malicious_archive_is_refused_and_nothing_lands_outside_the_data_dir(tmp_path, capsys, build, message):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    build(mirror)
    data_dir = tmp_path / "data"
    status = main(["download", "pacs", "--data-dir", str(data_dir), "--mirror", str(mirror)])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and "nothing was installed" in err
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    assert not (data_dir / "PACS").exists()
    assert not (data_dir / ".downloads" / "pacs.staging").exists()
    outside = {p for p in tmp_path.rglob("*") if data_dir not in p.parents and p != data_dir}
    assert outside == {mirror, mirror / "PACS.zip"}


def test_a_refused_archive_is_deleted_so_another_mirror_is_used_next_time(tmp_path, capsys):
    bad, good = tmp_path / "bad", tmp_path / "good"
    _zip(bad / "PACS.zip", {"kfold/photo/dog/0.png": b"x", "../escaped.txt": b"pwned"})
    _pacs_zip(good / "PACS.zip")
    data_dir = tmp_path / "data"
    assert main(["download", "pacs", "--data-dir", str(data_dir), "--mirror", str(bad)]) == 2
    assert "deleted PACS.zip so that the next attempt downloads anew" in capsys.readouterr().err
    assert not (data_dir / ".downloads" / "PACS.zip").exists()
    assert main(["download", "pacs", "--data-dir", str(data_dir), "--mirror", str(good)]) == 0
    assert len(list((data_dir / "PACS").rglob("*.png"))) == 16


def test_safe_extract_refuses_a_member_before_writing_any_of_a_zip(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"ok.txt": b"fine", "../bad.txt": b"x"})
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, target)
    assert list(target.iterdir()) == []


def test_domain_net_gathers_six_domains_and_removes_domainbed_duplicates(tmp_path):
    mirror = tmp_path / "mirror"
    png = image_bytes(5)
    domains = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    for domain in domains:
        _zip(
            mirror / f"{domain}.zip",
            {f"{domain}/{c}/{domain}_{i}.jpg": png for c in ("cat", "zebra") for i in range(3)},
        )
    (mirror / "domain_net_duplicates.txt").write_text(
        "clipart/cat/clipart_0.jpg\nreal/zebra/real_2.jpg\nreal/zebra/gone.jpg\n"
    )
    data_dir = tmp_path / "data"
    # The real archives' sha256 are pinned; these stand-ins need theirs passed explicitly.
    pins = [arg for d in domains for arg in ("--sha256", f"{d}.zip={_sha256(mirror / f'{d}.zip')}")]
    assert main(["download", "domain_net", "--data-dir", str(data_dir), "--mirror", str(mirror), *pins]) == 0
    root = data_dir / "domain_net"
    assert sorted(p.name for p in root.iterdir()) == domains
    assert len(list(root.rglob("*.jpg"))) == 6 * 6 - 2
    assert not (root / "clipart" / "cat" / "clipart_0.jpg").exists()
    assert (root / "clipart" / "cat" / "clipart_1.jpg").is_file()


def test_terra_incognita_is_built_from_its_annotations(tmp_path):
    mirror = tmp_path / "mirror"
    images = {f"eccv_18_all_images_sm/{name}.jpg": image_bytes(i, "JPEG") for i, name in enumerate("abcdef")}
    _tar_gz(mirror / "eccv_18_all_images_sm.tar.gz", images)
    categories = [
        {"id": 1, "name": "bobcat"},
        {"id": 2, "name": "empty"},
        {"id": 3, "name": "deer"},
        {"id": 4, "name": "coyote"},
    ]
    train = {
        "categories": categories,
        "images": [
            {"id": "a", "file_name": "a.jpg", "location": 38},  # int location, as in the ECCV files
            {"id": "b", "file_name": "b.jpg", "location": "100"},
            {"id": "c", "file_name": "c.jpg", "location": 7},  # not one of DomainBed's locations
            {"id": "d", "file_name": "d.jpg", "location": 43},
        ],
        "annotations": [
            {"image_id": "a", "category_id": 1},
            {"image_id": "b", "category_id": 2},
            {"image_id": "b", "category_id": 4},  # two classes: DomainBed copies it into both
            {"image_id": "c", "category_id": 1},
            {"image_id": "d", "category_id": 3},  # a class DomainBed leaves out
        ],
    }
    cis_val = {
        "categories": categories,
        "images": [
            {"id": "e", "file_name": "e.jpg", "location": 46},
            {"id": "z", "file_name": "z.jpg", "location": 46},
        ],
        "annotations": [{"image_id": "e", "category_id": 2}, {"image_id": "z", "category_id": 2}],
    }
    _tar_gz(
        mirror / "eccv_18_annotations.tar.gz",
        {
            "eccv_18_annotation_files/train_annotations.json": json.dumps(train).encode(),
            "eccv_18_annotation_files/cis_val_annotations.json": json.dumps(cis_val).encode(),
        },
    )
    data_dir = tmp_path / "data"
    assert main(["download", "terra_incognita", "--data-dir", str(data_dir), "--mirror", str(mirror)]) == 0
    root = data_dir / "terra_incognita"
    built = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    assert built == [
        "location_100/coyote/b.jpg",
        "location_100/empty/b.jpg",
        "location_38/bobcat/a.jpg",
        "location_46/empty/e.jpg",
    ]
    assert (root / "location_38" / "bobcat" / "a.jpg").read_bytes() == images["eccv_18_all_images_sm/a.jpg"]


def test_each_download_matches_its_dataset_config():
    for name, source in SOURCES.items():
        config = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "dataset" / f"{name}.yaml"))
        assert config["dataset"]["root"] == f"${{paths.data_dir}}/{source.folder}"
    terra = OmegaConf.load(CONFIG_DIR / "dataset" / "terra_incognita.yaml").dataset
    assert sorted(terra.domains) == sorted(f"location_{loc}" for loc in TERRA_LOCATIONS)
    assert list(terra.classes) == sorted(TERRA_CATEGORIES)


@pytest.mark.e2e  # python -m in a process of its own
def test_python_dash_m_download_is_the_same_command(tmp_path):
    archive = _pacs_zip(tmp_path / "mirror" / "PACS.zip")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "genie_dg.data.download",
            "pacs",
            "--data-dir",
            str(tmp_path / "data"),
            "--mirror",
            str(archive.parent),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "PACS" / "sketch" / "horse" / "1.png").is_file()
    unknown = subprocess.run(
        [sys.executable, "-m", "genie_dg.data.download", "mnist"], capture_output=True, text=True, timeout=120
    )
    assert unknown.returncode == 2 and "invalid choice: 'mnist'" in unknown.stderr
