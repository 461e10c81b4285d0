"""results/domainbed_cpu holds the record of the one DomainBed RotatedMNIST run made on the CPU
(docs/mnist-benchmarks.md, "The CPU run of one target"): the whole protocol, and the figure the
page reports is what `genie-dg collect` selects from it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from genie_dg.results.collect import collect
from genie_dg.results.records import RESULTS_FILE

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "domainbed_cpu"
DOCS = ROOT / "docs" / "mnist-benchmarks.md"


def test_the_record_is_the_whole_protocol_for_one_target():
    (path,) = RECORDS.glob(f"*/{RESULTS_FILE}")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(100, 5001, 100)), "5,000 steps, evaluated every 100"
    first = records[0]
    assert (first["dataset"], first["algorithm"], first["optimizer"]) == ("rotated_mnist", "ERM", "Adam")
    assert first["hparams"] == {"optimizer.lr": 0.001} and first["backbone"]["weights"]["model"] == "MnistCNN"
    assert first["test_domains"] == ["rot0"] and first["trial_seed"] == 0 and first["hparams_seed"] == 0


def test_the_page_reports_the_selected_accuracy():
    rows = [
        row
        for row in csv.DictReader(io.StringIO(collect(RECORDS, "csv", ["iid"])))
        if row["column"] == "rot0" and row["mean"]
    ]
    (row,) = rows
    section = DOCS.read_text().split("## The CPU run of one target", 1)[1]
    assert f"| rot0 | 95.9 | {float(row['mean']):.1f} |" in section
