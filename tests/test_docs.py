"""The documentation: the MkDocs site builds strictly and offline, and the front page stays short.

``make docs`` runs the same ``mkdocs build --strict``; here it goes into a temporary folder, in a
process whose sockets refuse to connect, so a build that needed the network would fail too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
# Two screens of a terminal or a browser: what a newcomer reads before the docs.
FRONT_PAGE_MAX_LINES = 100
# mkdocs' command line in a process where opening a network connection raises.
OFFLINE_MKDOCS = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("the docs build tried to use the network")
socket.socket.connect = refuse
socket.create_connection = refuse
from mkdocs.__main__ import cli
sys.exit(cli())
"""


def build_site(config: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            OFFLINE_MKDOCS,
            "build",
            "--strict",
            "--config-file",
            str(config),
            "--site-dir",
            str(site_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def nav_pages(config: Path) -> list[str]:
    """The Markdown files the nav lists (the config's ``!!python/name`` tags are not used here)."""
    nav = yaml.safe_load(config.read_text())["nav"]
    return [page for entry in nav for page in entry.values()]


def test_the_site_builds_strictly_and_offline_without_a_warning(tmp_path):
    result = build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "WARNING" not in log, log
    for page in nav_pages(ROOT / "mkdocs.yml"):
        built = tmp_path / "site" / ("index.html" if page == "index.md" else f"{page[: -len('.md')]}/index.html")
        assert built.is_file(), f"{page} is in the nav but was not built"


@pytest.fixture
def docs_copy(tmp_path) -> Path:
    """A copy of mkdocs.yml and docs/ that a test may break."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


@pytest.mark.parametrize(
    ("breakage", "reported"),
    [
        ("link", "missing-page.md"),
        ("anchor", "#no-such-section"),
        ("page left out of the nav", "orphan.md"),
    ],
)
def test_the_strict_build_fails_on_a_broken_reference(docs_copy, breakage, reported):
    index = docs_copy / "docs" / "index.md"
    if breakage == "link":
        index.write_text(index.read_text() + "\nSee [a page](missing-page.md).\n")
    elif breakage == "anchor":
        index.write_text(index.read_text() + "\nSee [a section](architecture.md#no-such-section).\n")
    else:
        (docs_copy / "docs" / "orphan.md").write_text("# Orphan\n")
    result = build_site(docs_copy / "mkdocs.yml", docs_copy / "site")
    assert result.returncode != 0, f"a {breakage} passed the strict build"
    assert reported in result.stdout + result.stderr


def test_the_front_page_fits_on_two_screens():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= FRONT_PAGE_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_relative_link_of_the_front_page_reaches_a_file():
    readme = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in t and not t.startswith("#")]
    assert targets, "the front page links into docs/"
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
