"""The installed package carries its Hydra configs: a wheel built from this checkout, installed
into an empty folder, composes train.py's config from anywhere, with no checkout beside it; a
user's own config folder adds groups beside the shipped ones."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from genie_dg.conf import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_wheel_ships_every_config_and_the_installed_package_composes_them(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("genie_dg-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("genie_dg/conf/")}
    expected = {f"genie_dg/conf/{path.relative_to(CONFIG_DIR).as_posix()}" for path in CONFIG_DIR.rglob("*.yaml")}
    assert "genie_dg/conf/train.yaml" in expected
    assert expected <= shipped, sorted(expected - shipped)

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = """
from hydra import compose, initialize_config_dir
from genie_dg.conf import CONFIG_DIR
from genie_dg.resolvers import register_resolvers

register_resolvers()
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = compose("train", overrides=["dataset=pacs", "optimizer=genie"])
print(CONFIG_DIR)
print(cfg.backbone.name, cfg.optimizer._target_)
"""
    # The installed copy comes first on the path (before the editable checkout), and no checkout
    # lies in the working directory.
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config_dir, composed = result.stdout.strip().splitlines()[-2:]
    assert Path(config_dir) == site / "genie_dg" / "conf"
    assert composed.split() == ["resnet50.tv_in1k", "genie_dg.optim.GENIE"]


def test_a_users_config_folder_adds_options_beside_the_shipped_ones(tmp_path):
    from hydra import compose, initialize_config_dir

    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "my_sgd.yaml").write_text("_target_: torch.optim.SGD\n_partial_: true\nlr: 0.123\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        mine = compose("train", overrides=[searchpath, "optimizer=my_sgd"])
        shipped = compose("train", overrides=[searchpath, "optimizer=genie"])
    assert (mine.optimizer._target_, mine.optimizer.lr) == ("torch.optim.SGD", 0.123)
    assert shipped.optimizer._target_ == "genie_dg.optim.GENIE"
