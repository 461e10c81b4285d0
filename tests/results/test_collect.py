"""`genie-dg collect`: DomainBed-style tables from hand-built records and from a real golden sweep."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from genie_dg.cli import main
from genie_dg.errors import UserInputError
from genie_dg.results.collect import build_tables, collect
from genie_dg.results.records import RESULTS_FILE, record_line
from genie_dg.results.selection import IIDAccuracySelectionMethod, LeaveOneOutSelectionMethod

from helpers import FIXTURES
from helpers.records_factory import lodo_record, make_record

GOLDEN = FIXTURES / "golden_sweep"
GOLDEN_TABLES = FIXTURES / "golden_tables.md"

# GENIE + ERM: every target, trials 0 and 1; Adam + ERM: target A, trial 0 only.
GENIE_ACCS = {(0, "A"): 0.80, (1, "A"): 0.90, (0, "B"): 0.60, (1, "B"): 0.70, (0, "C"): 0.30, (1, "C"): 0.50}


def _records():
    records = [
        lodo_record(1, 0.5, target_in=acc, test=(column,), trial_seed=trial)
        for (trial, column), acc in GENIE_ACCS.items()
    ]
    records.append(lodo_record(1, 0.5, target_in=0.42, test=("A",), optimizer="Adam"))
    return records


def test_cells_are_mean_and_population_standard_error_over_trials_in_percent():
    dataset_table, averages = build_tables(_records(), IIDAccuracySelectionMethod)
    assert dataset_table.columns == ("A", "B", "C", "Avg")
    rows = dict(dataset_table.rows)
    assert [c.text("+/-") for c in rows[("GENIE", "ERM")]] == [
        "85.0 +/- 3.5",
        "65.0 +/- 3.5",
        "40.0 +/- 7.1",
        "63.3",
    ]
    assert [c.text("+/-") for c in rows[("Adam", "ERM")]] == ["42.0 +/- 0.0", "X", "X", "X"]
    # Averages: per trial the mean over the three targets (0.5667, 0.7), then mean +- SE.
    assert averages.columns == ("toy", "Avg")
    genie = dict(averages.rows)[("GENIE", "ERM")]
    assert genie[0].mean == pytest.approx(100 * (0.5667 + 0.7) / 2, abs=0.01)
    assert genie[0].stderr == pytest.approx(100 * abs(0.7 - 0.56667) / 2 / 2**0.5, abs=0.01)
    assert [c.text("+/-") for c in dict(averages.rows)[("Adam", "ERM")]] == ["X", "X"]


def test_a_trial_missing_a_target_is_left_out_of_the_dataset_average():
    records = [r for r in _records() if not (r.run.trial_seed == 1 and r.run.test_domains == ("C",))]
    _, averages = build_tables(records, IIDAccuracySelectionMethod)
    genie = dict(averages.rows)[("GENIE", "ERM")][0]
    assert genie.trials == (pytest.approx((0.8 + 0.6 + 0.3) / 3),)


def test_leave_one_out_tables_leave_out_single_domain_generalization_runs():
    sdg = make_record(
        1, {"A": {"out": 0.9}, "B": {"in": 0.5}}, protocol="sdg", test=("B",), train=("A",), dataset="other"
    )
    titles = [t.title for t in build_tables([*_records(), sdg], LeaveOneOutSelectionMethod)]
    assert titles == ["toy (leave-one-domain-out, columns: target domain)", "Averages"]
    iid_titles = [t.title for t in build_tables([*_records(), sdg], IIDAccuracySelectionMethod)]
    assert "other (single-domain generalization, columns: training domain)" in iid_titles


def _write_sweep(root: Path, records) -> Path:
    for record in records:
        run = root / record.run_dir
        run.mkdir(parents=True, exist_ok=True)
        with (run / RESULTS_FILE).open("a") as file:
            file.write(record_line(record.run, record.step, record.accuracy) + "\n")
    return root


def test_markdown_latex_and_csv_render_the_same_cells(tmp_path):
    root = _write_sweep(tmp_path / "sweep", [*_records(), lodo_record(1, 0.5, 0.5, test=("A",), dataset="my_set")])
    markdown = collect(root, "markdown", ["iid"])
    assert "## Model selection: training-domain validation set" in markdown
    assert "| GENIE | ERM | 85.0 ± 3.5 | 65.0 ± 3.5 | 40.0 ± 7.1 | 63.3 |" in markdown
    assert "| Adam | ERM | 42.0 ± 0.0 | X | X | X |" in markdown
    latex = collect(root, "latex", ["iid"])
    assert "GENIE & ERM & 85.0 $\\pm$ 3.5 & 65.0 $\\pm$ 3.5 & 40.0 $\\pm$ 7.1 & 63.3 \\\\" in latex
    assert "\\textbf{my\\_set}" in latex and latex.rstrip().endswith("\\end{document}")
    rows = list(csv.DictReader(io.StringIO(collect(root, "csv", ["iid"]))))
    cell = next(r for r in rows if r["table"].startswith("toy") and r["optimizer"] == "GENIE" and r["column"] == "A")
    assert (float(cell["mean"]), float(cell["stderr"]), cell["trials"]) == (
        85.0,
        pytest.approx(3.5355, abs=1e-3),
        "2",
    )
    missing = next(r for r in rows if r["table"].startswith("toy") and r["optimizer"] == "Adam" and r["column"] == "B")
    assert missing["mean"] == missing["stderr"] == ""


def test_a_resumed_runs_repeated_step_counts_once(tmp_path):
    root = _write_sweep(tmp_path / "sweep", [lodo_record(1, 0.5, 0.2), lodo_record(1, 0.5, 0.9)])
    assert "| GENIE | ERM | 90.0 ± 0.0 | X | X | X |" in collect(root, "markdown", ["iid"])


def test_bad_lines_are_skipped_named_by_file_and_line_and_counted(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(GOLDEN, sweep)
    first, second = sorted(sweep.rglob(RESULTS_FILE))[:2]
    first_lines = first.read_text().splitlines(keepends=True)
    # A line cut short by a kill at the end of one run, a record without its step inside another.
    first.write_text("".join(first_lines) + first_lines[-1][:40])
    record = json.loads(second.read_text().splitlines()[0])
    del record["step"]
    second.write_text(json.dumps(record) + "\n" + second.read_text())

    assert main(["collect", str(sweep)]) == 0
    captured = capsys.readouterr()
    assert f"skipped {first}:{len(first_lines) + 1}: not JSON" in captured.err
    assert f"skipped {second}:1: not a record (no 'step')" in captured.err
    assert captured.out.splitlines()[0].endswith("(skipped lines that are not records: 2)")
    golden = GOLDEN_TABLES.read_text()
    assert captured.out.split("\n", 1)[1] == golden.split("\n", 1)[1], "the good records make the same tables"


def test_golden_sweep_tables_are_unchanged():
    """tests/fixtures/golden_sweep holds real tiny runs (tests/fixtures/make_golden_sweep.sh)."""
    assert collect(GOLDEN) == GOLDEN_TABLES.read_text()


def test_golden_sweep_covers_every_selection_method_partial_rows_and_sdg():
    text = GOLDEN_TABLES.read_text()
    names = {
        "iid": "training-domain validation set",
        "loo": "leave-one-domain-out cross-validation",
        "oracle": "test-domain validation set (oracle)",
    }
    sections = {
        key: text.split(f"## Model selection: {name}")[1].split("## Model selection")[0] for key, name in names.items()
    }
    for key, section in sections.items():
        lodo = section.split("### colored_mnist (leave-one-domain-out")[1].split("###")[0]
        genie = next(line for line in lodo.splitlines() if line.startswith("| GENIE | ERM |"))
        assert genie.count("±") == 3 and "X" not in genie, f"{key}: GENIE + ERM has every target"
        adam = next(line for line in lodo.splitlines() if line.startswith("| Adam | ERM |"))
        # Adam + ERM has one run (target plus90): no pair runs, so nothing for leave-one-out.
        expected = "| Adam | ERM | X | X | X | X |" if key == "loo" else "| Adam | ERM | 53.2 ± 0.0 | X | X | X |"
        assert adam == expected, key
        assert ("### colored_mnist (single-domain generalization" in section) == (key != "loo")


def test_cli_collect_prints_the_tables_and_refuses_a_folder_without_records(tmp_path, capsys):
    assert main(["collect", str(GOLDEN), "--format", "csv", "--selection", "oracle"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["selection"] for r in rows} == {"oracle"} and rows
    assert main(["collect", str(tmp_path)]) == 2
    assert "no results.jsonl" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="no results.jsonl"):
        collect(tmp_path)


def test_golden_sweep_records_are_what_runs_write():
    lines = [json.loads(line) for path in GOLDEN.rglob(RESULTS_FILE) for line in path.read_text().splitlines()]
    assert {line["step"] for line in lines} == {2, 4}
    pairs = [line for line in lines if len(line["test_domains"]) == 2]
    assert pairs and all(set(line["accuracy"][d]) == {"in", "out"} for line in pairs for d in line["test_domains"])
    # One draw per (hparams seed, trial seed): every target of a draw trains with the same values.
    draws = {}
    for line in lines:
        if line["optimizer"] == "GENIE" and line["protocol"] == "lodo":
            draws.setdefault((line["hparams_seed"], line["trial_seed"]), set()).add(json.dumps(line["hparams"]))
    assert len(draws) == 4 and all(len(values) == 1 for values in draws.values())
    assert draws[(0, 0)] != draws[(1, 0)] != draws[(1, 1)]


def test_collect_finds_runs_at_any_depth(tmp_path):
    shutil.copytree(GOLDEN, tmp_path / "a" / "b")
    assert collect(tmp_path) == GOLDEN_TABLES.read_text()


def test_the_readme_study_tables_are_what_the_committed_records_give():
    """results/offline_study holds the records of the offline study (216 runs) beside its README:
    every table row that README shows comes out of `genie-dg collect` on them."""
    root = Path(__file__).resolve().parents[2]
    study = (root / "results" / "offline_study" / "README.md").read_text()
    shown = [line for line in study.splitlines() if line.startswith("| ") and "±" in line]
    assert len(shown) == 8 * 4, "RotatedMNIST, ColoredMNIST, averages, oracle averages: 8 rows each"
    runs = list((root / "results" / "offline_study").glob(f"*/{RESULTS_FILE}"))
    assert len(runs) == 216
    iid = collect(root / "results" / "offline_study", "markdown", ["iid"]).splitlines()
    oracle = collect(root / "results" / "offline_study", "markdown", ["oracle"]).splitlines()
    assert set(shown[:24]) <= set(iid)
    assert set(shown[24:]) <= set(oracle)
