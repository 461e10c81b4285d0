"""scripts/gpu_check.py: the whole check on the CPU with --tiny, and its time budget."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_check_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    finished = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["tiny"] is True and report["failed_parts"] == []
    assert [(r["optimizer"], r["image_size"]) for r in report["resnet50"]] == [("adam", 32), ("genie", 32)]
    assert all(r["images_per_s"] > 0 for r in report["resnet50"])
    assert report["ddp"]["returncode"] == 0 and "trainer=ddp trainer.devices=1" in report["ddp"]["command"]
    assert 0.0 <= report["ddp"]["target_acc"] <= 1.0
    runs = report["domainbed"]
    assert [(r["target"], r["optimizer"]) for r in runs] == [("rot0", "adam"), ("rot0", "genie")]
    assert all("trainer.precision=bf16-mixed" in r["overrides"] for r in runs)
    assert all(0.0 <= r["target_acc"] <= 1.0 for r in runs)
    table = (out / "gpu_check.txt").read_text()
    assert "DomainBed ERM" in table and "rot0               95.9" in table
    assert "ResNet-50" in table and "DDP" in table
    assert table in finished.stdout


def test_no_pair_starts_past_the_budget(gpu_check, tmp_path, capsys):
    code = gpu_check.main(["--tiny", "--budget-s", "0", "--skip", "resnet50", "ddp", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["domainbed"] == [] and report["domainbed_stopped"].startswith("before rot0")
    assert "(stopped before rot0" in (tmp_path / "gpu_check.txt").read_text()


def test_without_a_gpu_it_asks_for_tiny(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: no CUDA device is visible; run with --tiny to check the CPU path"
