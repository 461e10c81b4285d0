"""notebooks/results.ipynb, executed on a copy of the committed golden sweep (tests/fixtures/golden_sweep)."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from statistics import fmean

import matplotlib.image
import nbformat
import pytest
from nbclient import NotebookClient

from genie_dg.results.collect import collect

from helpers import FIXTURES

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "results.ipynb"
GOLDEN = FIXTURES / "golden_sweep"


def _execute(sweep_dir: Path, monkeypatch: pytest.MonkeyPatch, figure_path: Path | None = None):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("GENIE_SWEEP_DIR", str(sweep_dir))
    if figure_path is None:
        monkeypatch.delenv("GENIE_FIGURE_PATH", raising=False)
    else:
        monkeypatch.setenv("GENIE_FIGURE_PATH", str(figure_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return notebook


def _outputs(notebook, mime: str) -> list[str]:
    return [
        output["data"][mime]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if mime in output.get("data", {})
    ]


def _expected_curves(sweep_dir: Path) -> dict[tuple[str, str, int], float]:
    """Mean target accuracy (%) per (protocol, optimizer + algorithm, step), straight from the JSON lines:
    single-target runs (every SDG run), each target's "in" part, the last line of a step winning."""
    per_run: dict[tuple[Path, int], dict] = {}
    for path in sorted(sweep_dir.rglob("results.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                per_run[(path, record["step"])] = record
    values: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for record in per_run.values():
        if record["protocol"] == "sdg" or len(record["test_domains"]) == 1:
            acc = fmean(record["accuracy"][d]["in"] for d in record["test_domains"])
            key = (record["protocol"], f"{record['optimizer']} + {record['algorithm']}", record["step"])
            values[key].append(100 * acc)
    return {key: fmean(accs) for key, accs in values.items()}


def test_results_notebook_shows_the_tables_and_plots_accuracy_vs_steps(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(GOLDEN, sweep_dir)
    notebook = _execute(sweep_dir, monkeypatch)

    # Whatever is stored is stored without outputs.
    stored = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in stored.cells if cell.cell_type == "code")

    # The tables: exactly what genie-dg collect prints for the same directory, all three methods.
    (tables,) = _outputs(notebook, "text/markdown")
    assert tables == collect(sweep_dir)
    assert tables.startswith("Total records: 54\n")
    methods = ("training-domain validation set", "leave-one-domain-out cross-validation", "test-domain")
    for method in methods:
        assert f"## Model selection: {method}" in tables
    assert "| GENIE | ERM | 34.1 ± 2.5 | 57.9 ± 6.0 | 21.7 ± 2.6 | 37.9 |" in tables  # training-domain val.
    assert "| GENIE | ERM | 54.6 ± 7.6 | 52.0 ± 0.2 | 21.7 ± 2.6 | 42.8 |" in tables  # leave-one-out
    assert "| Adam | ERM | 53.2 ± 0.0 | X | X | X |" in tables  # partial row: plus90 only

    # The curves: one column per optimizer, means as computed from the raw records.
    (curves,) = [text for text in _outputs(notebook, "text/plain") if "optimizer" in text]
    assert "Adam + ERM" in curves and "GENIE + ERM" in curves
    expected = _expected_curves(sweep_dir)
    lines = {(protocol, optimizer) for protocol, optimizer, _ in expected}
    assert lines == {("lodo", "Adam + ERM"), ("lodo", "GENIE + ERM"), ("sdg", "GENIE + ERM")}
    assert {step for _, _, step in expected} == {2, 4}
    for value in expected.values():
        assert f"{value:.2f}" in curves
    assert f"{expected[('lodo', 'Adam + ERM', 4)]:.2f}" == "53.22"  # the Adam run's plus90 accuracy at step 4

    # The figure: a real PNG with two panels (leave-one-domain-out, single-domain), in the copied sweep.
    figure = sweep_dir / "accuracy_vs_steps.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
    image = matplotlib.image.imread(figure)
    assert image.shape[1] > 1.5 * image.shape[0] and image.std() > 0.05
    assert not list(GOLDEN.glob("*.png")), "the notebook wrote into the committed golden sweep"


def test_results_notebook_saves_the_figure_where_genie_figure_path_says(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(GOLDEN, sweep_dir)
    figure = tmp_path / "figures" / "curves.png"
    figure.parent.mkdir()
    _execute(sweep_dir, monkeypatch, figure)
    assert figure.stat().st_size > 10_000
    assert not (sweep_dir / "accuracy_vs_steps.png").exists()
