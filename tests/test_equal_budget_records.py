"""results/equal_budget holds the records of the equal-budget comparison that
docs/mnist-benchmarks.md reports: its table is what `genie-dg collect` gives on them."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

from genie_dg.results.collect import collect
from genie_dg.results.records import RESULTS_FILE, load_records

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "equal_budget"
DOCS = ROOT / "docs" / "mnist-benchmarks.md"
OPTIMIZERS = ("GENIE", "Adam", "SGD", "SAM")
TARGETS = ("rot0", "rot75")


def table_rows(collected_csv: str) -> list[str]:
    """The docs table's rows, from `genie-dg collect --format csv --selection iid`: per optimizer,
    each target's mean +- standard error over trial seeds (with the number of trials), and the
    mean of the two targets' means."""
    cells = {}
    for row in csv.DictReader(io.StringIO(collected_csv)):
        if row["column"] in TARGETS and row["mean"]:
            cells[row["optimizer"], row["column"]] = (float(row["mean"]), float(row["stderr"]), int(row["trials"]))

    def shown(cell: tuple[float, float, int] | None) -> str:
        return "X" if cell is None else f"{cell[0]:.1f} ± {cell[1]:.1f} ({cell[2]})"

    lines = []
    for optimizer in OPTIMIZERS:
        found = [cells.get((optimizer, target)) for target in TARGETS]
        average = f"{sum(c[0] for c in found) / len(found):.1f}" if all(found) else "X"
        lines.append(f"| {optimizer} | {' | '.join(shown(c) for c in found)} | {average} |")
    return lines


def test_every_record_belongs_to_the_equal_budget_design():
    runs = sorted(RECORDS.glob(f"*/{RESULTS_FILE}"))
    assert runs, "the finished runs' records are committed"
    for path in runs:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["step"] for r in records] == [100, 200, 300], f"{path}: a finished 300-step run"
        first = records[0]
        assert first["dataset"] == "rotated_mnist" and first["algorithm"] == "ERM"
        assert first["optimizer"] in OPTIMIZERS and tuple(first["test_domains"]) in {(t,) for t in TARGETS}
        assert 1 <= first["hparams_seed"] <= 6 and first["trial_seed"] in (0, 1)


def test_the_docs_table_is_what_the_committed_records_give():
    section = DOCS.read_text().split("## Equal-budget optimizer comparison", 1)[1]
    shown = [line for line in section.splitlines() if line.startswith("| ") and line.split(" | ")[0][2:] in OPTIMIZERS]
    assert shown == table_rows(collect(RECORDS, "csv", ["iid"]))
    runs = len(list(RECORDS.glob(f"*/{RESULTS_FILE}")))
    told = "all 96 runs" if runs == 96 else f"{runs} of 96 runs"
    assert told in section, "the page says how many runs the table rests on"


def test_the_records_are_the_whole_design_once():
    """Six draws x two trials for every optimizer and target, each run once: the table's cells
    rest on the same search for all four optimizers."""
    identities = {record.run_dir: record.run for record in load_records(RECORDS)}
    assert len(identities) == len(list(RECORDS.glob(f"*/{RESULTS_FILE}"))), "every run's records are readable"
    runs = Counter((run.optimizer, *run.test_domains, run.trial_seed, run.hparams_seed) for run in identities.values())
    design = {(o, t, trial, draw) for o in OPTIMIZERS for t in TARGETS for trial in (0, 1) for draw in range(1, 7)}
    assert set(runs) == design, f"missing: {sorted(design - set(runs))[:3]}, extra: {sorted(set(runs) - design)[:3]}"
    assert set(runs.values()) == {1}, "no run is recorded twice"
