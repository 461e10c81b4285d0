"""`genie-dg verify-data`: per-domain, per-class counts against the dataset config."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from genie_dg.cli import main
from genie_dg.conf import CONFIG_DIR

from helpers.trees import write_tree

ROOT = Path(__file__).resolve().parents[2]


def _pacs_counts() -> dict[str, dict[str, int]]:
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "dataset" / "pacs.yaml").dataset.expected_counts)


@pytest.fixture
def full_pacs(tmp_path) -> Path:
    """A PACS-shaped tree with exactly DomainBed's 9,991 (tiny) images; returns the data dir."""
    write_tree(tmp_path / "data" / "PACS", _pacs_counts())
    return tmp_path / "data"


@pytest.mark.slow  # writes and scans PACS's 9,991 files
def test_a_complete_dataset_prints_every_count_and_exits_0(full_pacs, capsys):
    assert main(["verify-data", "pacs", "--data-dir", str(full_pacs)]) == 0
    out = capsys.readouterr().out
    for cell in ("379/379", "816/816", "80/80", "2048/2048", "3929/3929"):
        assert cell in out
    assert "pacs: OK" in out


@pytest.mark.slow  # writes and scans PACS's 9,991 files
def test_a_missing_image_is_a_mismatch_and_exits_1(full_pacs, capsys, caplog):
    (full_pacs / "PACS" / "photo" / "house" / "00000.png").unlink()
    (full_pacs / "PACS" / "photo" / "house" / "Thumbs.db").write_bytes(b"\0")
    assert main(["verify-data", "pacs", "--data-dir", str(full_pacs)]) == 1
    captured = capsys.readouterr()
    assert "photo/house: 279 found, 280 expected" in captured.out
    assert "1 count mismatch(es)" in captured.out
    assert "ignored 1 path(s)" in caplog.text and "photo/house/Thumbs.db" in caplog.text


@pytest.mark.slow  # writes and decodes PACS's 9,991 files
def test_check_images_finds_an_unreadable_image(full_pacs, capsys):
    (full_pacs / "PACS" / "sketch" / "dog" / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["verify-data", "pacs", "--data-dir", str(full_pacs), "--check-images"]) == 1
    out = capsys.readouterr().out
    assert "unreadable sketch/dog/00003.png" in out
    assert "decoded 9991 images: 1 unreadable" in out


def test_a_link_looping_back_to_its_domain_is_not_counted_and_is_named(tmp_path, capsys, caplog):
    root = write_tree(tmp_path / "mine", {"day": {"cat": 2, "dog": 1}, "night": {"dog": 3}})
    (root / "day" / "cat" / "loop").symlink_to(root / "day", target_is_directory=True)
    (root / "night" / "cat").symlink_to(tmp_path, target_is_directory=True)
    assert main(["verify-data", "image_folder", "--root", str(root)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "total │ 3 │ 3" in out, "each image counted once, under its own class"
    assert "did not follow 2 symbolic link(s)" in caplog.text
    assert "day/cat/loop -> day (a folder read where it is)" in caplog.text
    assert f"night/cat -> {tmp_path.resolve()} (outside the dataset root)" in caplog.text


def test_a_user_tree_is_counted_without_expectations(tmp_path, capsys):
    root = write_tree(tmp_path / "mine", {"day": {"cat": 2, "dog": 1}, "night": {"dog": 3}})
    assert main(["verify-data", "image_folder", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "pins no expected counts" in out and "image_folder: OK" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["verify-data", "pacz"], "unknown dataset 'pacz'"),
        (["verify-data", "rotated_mnist"], "'rotated_mnist' is built by genie_dg.data.rotated_mnist, not read from"),
        (["verify-data", "image_folder"], "pass --root"),
        (["verify-data", "vlcs", "--data-dir", "/nonexistent"], "VLCS does not exist"),
    ],
)
def test_unusable_requests_are_one_error_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    # What it offers instead are datasets there are files of: never the bundled digits.
    assert "colored_mnist" not in err and ("verify-data checks" not in err or "pacs" in err)


@pytest.mark.e2e  # the installed console script, run
def test_the_console_script_is_installed_and_verifies(full_pacs):
    script = shutil.which("genie-dg", path=str(Path(sys.executable).parent))
    assert script, "pip install -e . creates the genie-dg console script"
    result = subprocess.run(
        [script, "verify-data", "pacs", "--data-dir", str(full_pacs)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "pacs: OK" in result.stdout


# Images per domain in DomainBed's trees; they add up to DomainBed's published 9,991 / 10,729 / 15,588.
DOMAINBED_TOTALS = {
    "pacs": {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929},
    "vlcs": {"Caltech101": 1415, "LabelMe": 2656, "SUN09": 3282, "VOC2007": 3376},
    "office_home": {"Art": 2427, "Clipart": 4365, "Product": 4439, "Real World": 4357},
}


@pytest.mark.parametrize("name", sorted(DOMAINBED_TOTALS))
def test_pinned_per_class_counts_cover_every_class_and_sum_to_domainbed_totals(name):
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "dataset" / f"{name}.yaml").dataset)
    counts = node["expected_counts"]
    assert list(counts) == node["domains"]
    for domain, per_class in counts.items():
        assert list(per_class) == node["classes"], domain
        assert sum(per_class.values()) == DOMAINBED_TOTALS[name][domain], domain
