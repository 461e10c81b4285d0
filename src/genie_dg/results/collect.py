"""``genie-dg collect <sweep dir>``: DomainBed's result tables (``scripts/collect_results.py``).

For each selection method: one table per dataset and protocol (rows: optimizer + algorithm;
columns: every domain of the dataset as target, or as the training domain under single-domain
generalization, then their average), then an average-over-datasets table. A cell is the mean
+- standard error, over trial seeds, of the test accuracy the method selects in each trial, in
percent; the standard error is DomainBed's, ``std / sqrt(n)`` with the population standard
deviation. A cell without any trial is "X", and so is an average over a row with an "X" in it,
as DomainBed prints them. A dataset's cell in the averages table averages, per trial, the
columns of that trial; trials that lack a column are left out there (DomainBed would average
whichever columns they have), so partial sweeps never mix averages over different domains.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, pstdev

from genie_dg.errors import UserInputError
from genie_dg.results.records import BadLine, Record, load_records
from genie_dg.results.selection import SELECTION_METHODS, Choice, GroupKey, SelectionMethod, group_records

FORMATS = ("markdown", "latex", "csv")
PROTOCOL_TITLES = {
    "lodo": "leave-one-domain-out, columns: target domain",
    "sdg": "single-domain generalization, columns: training domain",
}


@dataclass(frozen=True)
class Cell:
    """The accuracies (fractions) of the trials that make a cell, or, for an "Avg" cell, an average
    of other cells' means (``mean_only``, in percent)."""

    trials: tuple[float, ...] = ()
    mean_only: float | None = None

    @property
    def missing(self) -> bool:
        return not self.trials and self.mean_only is None

    @property
    def mean(self) -> float | None:
        """In percent."""
        if self.mean_only is not None:
            return self.mean_only
        return 100 * fmean(self.trials) if self.trials else None

    @property
    def stderr(self) -> float | None:
        """In percent; DomainBed's: population standard deviation over sqrt(trials)."""
        return 100 * pstdev(self.trials) / math.sqrt(len(self.trials)) if self.trials else None

    def text(self, plus_minus: str) -> str:
        if self.missing:
            return "X"
        if self.mean_only is not None:
            return f"{self.mean_only:.1f}"
        return f"{self.mean:.1f} {plus_minus} {self.stderr:.1f}"


@dataclass(frozen=True)
class Table:
    """One result table: ``rows[i]`` is ((optimizer, algorithm), cells in ``columns`` order)."""

    method: type[SelectionMethod]
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[tuple[str, str], tuple[Cell, ...]], ...]


def _average_cell(cells: Sequence[Cell]) -> Cell:
    """DomainBed's "Avg" column: the mean of the cells' means, "X" if any cell is missing."""
    if not cells or any(c.missing for c in cells):
        return Cell()
    return Cell(mean_only=fmean(c.mean for c in cells))


def build_tables(records: Sequence[Record], method: type[SelectionMethod]) -> list[Table]:
    """Per-dataset tables, then the averages table, for one selection method."""
    selected: dict[GroupKey, Choice] = {}
    for key, group in group_records(records).items():
        choice = method.sweep_acc(group)
        if choice is not None:
            selected[key] = choice
    row_keys = sorted({(r.run.optimizer, r.run.algorithm) for r in records}, key=lambda k: (k[0].lower(), k[1].lower()))
    # Each dataset's domains in its own order (DomainBed's environment order), first seen first.
    datasets: dict[tuple[str, str], tuple[str, ...]] = {}
    for record in records:
        datasets.setdefault((record.run.dataset, record.run.protocol), record.run.domains)
    tables, average_columns, averages = [], [], {row: [] for row in row_keys}
    for (dataset, protocol), domains in sorted(datasets.items()):
        if protocol not in method.protocols:
            continue
        average_columns.append(dataset if protocol == "lodo" else f"{dataset} ({protocol})")
        trials = sorted({k.trial_seed for k in selected if (k.dataset, k.protocol) == (dataset, protocol)})
        rows = []
        for optimizer, algorithm in row_keys:
            # accuracy[trial][column]: the selected test accuracy, None where nothing was selected.
            accuracy = {
                trial: [
                    getattr(
                        selected.get(GroupKey(dataset, protocol, optimizer, algorithm, trial, column)),
                        "test_acc",
                        None,
                    )
                    for column in domains
                ]
                for trial in trials
            }
            cells = [
                Cell(tuple(accs[i] for accs in accuracy.values() if accs[i] is not None)) for i in range(len(domains))
            ]
            rows.append(((optimizer, algorithm), (*cells, _average_cell(cells))))
            complete_trials = [fmean(accs) for accs in accuracy.values() if None not in accs]
            averages[(optimizer, algorithm)].append(Cell(tuple(complete_trials)))
        title = f"{dataset} ({PROTOCOL_TITLES.get(protocol, protocol)})"
        tables.append(Table(method, title, (*domains, "Avg"), tuple(rows)))
    if tables:
        rows = tuple((row, (*averages[row], _average_cell(averages[row]))) for row in row_keys)
        tables.append(Table(method, "Averages", (*average_columns, "Avg"), rows))
    return tables


def _totals(n_records: int, n_skipped: int) -> str:
    return f"Total records: {n_records}" + (f" (skipped lines that are not records: {n_skipped})" if n_skipped else "")


def _markdown(
    tables: Sequence[Table], methods: Sequence[type[SelectionMethod]], n_records: int, n_skipped: int = 0
) -> str:
    out = [_totals(n_records, n_skipped)]
    for method in methods:
        out += ["", f"## Model selection: {method.name}"]
        for table in (t for t in tables if t.method is method):
            header = ["Optimizer", "Algorithm", *table.columns]
            out += ["", f"### {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for (optimizer, algorithm), cells in table.rows:
                out.append("| " + " | ".join([optimizer, algorithm, *(c.text("±") for c in cells)]) + " |")
    return "\n".join(out) + "\n"


def _latex_escape(text: str) -> str:
    for char in "\\&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text


def _latex(
    tables: Sequence[Table], methods: Sequence[type[SelectionMethod]], n_records: int, n_skipped: int = 0
) -> str:
    out = [
        "\\documentclass{article}",
        "\\usepackage{booktabs}",
        "\\usepackage{adjustbox}",
        "\\begin{document}",
        f"% {_totals(n_records, n_skipped)}",
    ]
    for method in methods:
        out += ["", f"\\subsection{{Model selection: {_latex_escape(method.name)}}}"]
        for table in (t for t in tables if t.method is method):
            header = ["Optimizer", "Algorithm", *table.columns]
            out += [
                "",
                f"\\subsubsection{{{_latex_escape(table.title)}}}",
                "\\begin{center}",
                "\\adjustbox{max width=\\textwidth}{%",
                "\\begin{tabular}{ll" + "c" * len(table.columns) + "}",
                "\\toprule",
                " & ".join(f"\\textbf{{{_latex_escape(h)}}}" for h in header) + " \\\\",
                "\\midrule",
            ]
            for (optimizer, algorithm), cells in table.rows:
                texts = [_latex_escape(optimizer), _latex_escape(algorithm), *(c.text("$\\pm$") for c in cells)]
                out.append(" & ".join(texts) + " \\\\")
            out += ["\\bottomrule", "\\end{tabular}}", "\\end{center}"]
    out.append("\\end{document}")
    return "\n".join(out) + "\n"


def _csv(tables: Sequence[Table], methods: Sequence[type[SelectionMethod]], n_records: int, n_skipped: int = 0) -> str:
    """One row per cell (tidy), numbers in percent; a missing cell has empty numbers (the
    counts of records and skipped lines go to stderr only, keeping the table tidy)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["selection", "table", "optimizer", "algorithm", "column", "mean", "stderr", "trials"])
    for table in tables:
        for (optimizer, algorithm), cells in table.rows:
            for column, cell in zip(table.columns, cells, strict=True):
                numbers = (
                    ["", "", ""]
                    if cell.missing
                    else [
                        f"{cell.mean:.4f}",
                        "" if cell.stderr is None else f"{cell.stderr:.4f}",
                        str(len(cell.trials)) if cell.trials else "",
                    ]
                )
                writer.writerow([table.method.key, table.title, optimizer, algorithm, column, *numbers])
    return buffer.getvalue()


RENDERERS = {"markdown": _markdown, "latex": _latex, "csv": _csv}


def collect(root: Path, fmt: str = "markdown", selections: Sequence[str] = tuple(SELECTION_METHODS)) -> str:
    """The result tables of every run under ``root``, rendered as ``fmt``. A line of a
    ``results.jsonl`` that is not a record is skipped: named on stderr, counted in the output."""
    bad_lines: list[BadLine] = []
    records = load_records(root, bad_lines)
    for bad in bad_lines:
        print(f"warning: skipped {bad}", file=sys.stderr)
    if bad_lines:
        print(f"warning: skipped {len(bad_lines)} line(s) that are not records", file=sys.stderr)
    if not records:
        raise UserInputError(f"no results.jsonl under {root}: point genie-dg collect at a run or sweep directory")
    methods = [SELECTION_METHODS[key] for key in selections]
    tables = [table for method in methods for table in build_tables(records, method)]
    return RENDERERS[fmt](tables, methods, len(records), len(bad_lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sweep_dir", type=Path, help="a sweep (or run) directory; results.jsonl files are found at any depth"
    )
    parser.add_argument("--format", choices=FORMATS, default="markdown", help="output format (default: markdown)")
    parser.add_argument(
        "--selection",
        choices=tuple(SELECTION_METHODS),
        action="append",
        help="model selection method, repeatable (default: all three): iid = training-domain validation, "
        "loo = leave-one-domain-out, oracle = test-domain validation",
    )


def run(args: argparse.Namespace) -> int:
    if not args.sweep_dir.is_dir():
        raise UserInputError(f"{args.sweep_dir} is not a directory")
    print(collect(args.sweep_dir, args.format, args.selection or tuple(SELECTION_METHODS)), end="")
    return 0
