from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from genie_dg.pipeline import train

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_notebook_runs_on_a_finished_run(make_config, small_run, monkeypatch):
    cfg = make_config("trainer.max_steps=4", "trainer.val_check_interval=2", *small_run)
    run_dir = Path(train(cfg)["files"]["run_dir"])
    monkeypatch.setenv("GENIE_RUN_DIR", str(run_dir))
    notebook = nbformat.read(ROOT / "notebooks" / "run_metrics.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    table = notebook.cells[2].outputs[0]["data"]["text/plain"]
    assert "val/rot0/acc" in table and "val/rot15/acc" in table
    assert (run_dir / "domain_accuracy.png").stat().st_size > 1000
