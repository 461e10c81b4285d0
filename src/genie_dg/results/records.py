"""Per-validation records of a run, ``<run dir>/results.jsonl``, as DomainBed writes them.

Each validation appends one JSON line: what the run is (:class:`RunIdentity`), the step, and the
accuracy of every evaluated split of every domain in DomainBed's vocabulary::

    {"step": 300, "dataset": "rotated_mnist", "protocol": "lodo", "algorithm": "ERM",
     "optimizer": "GENIE", "domains": ["rot0", ...], "train_domains": ["rot15", ...],
     "test_domains": ["rot0"], "trial_seed": 0, "hparams_seed": 0, "seed": 0,
     "hparams": {"optimizer.lr": 0.5, ...},
     "accuracy": {"rot15": {"out": 0.93}, ..., "rot0": {"in": 0.81, "out": 0.80}}}

``out`` is a held-out part (of a training domain: training-domain validation; of a target domain,
when ``dataset.target_holdout=true``: test-domain validation, read only by oracle selection) and
``in`` the rest of a target domain, whose accuracy is reported (all of it without a held-out
part). The accuracy of the training data itself is not evaluated: no selection method reads it.
The run's ``summary.json`` holds the same identity, built once per run, under ``run``
(:func:`genie_dg.reporting.summarize`).
:class:`genie_dg.results.recorder.ResultsRecorder` writes the records; this module only reads and
writes the format, so ``genie-dg collect`` starts without importing Lightning.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class RunIdentity:
    """What a run is: the keys by which model selection and the result tables group records.

    ``dataset`` is the dataset's name, ``algorithm`` and ``optimizer`` their class names;
    ``trial_seed`` repeats a whole experiment, ``hparams_seed`` picks the hyper-parameter draw
    (0: defaults) and ``hparams`` holds the values of every searched hyper-parameter.
    """

    dataset: str
    protocol: str
    algorithm: str
    optimizer: str
    domains: tuple[str, ...]
    train_domains: tuple[str, ...]
    test_domains: tuple[str, ...]
    trial_seed: int
    hparams_seed: int
    seed: int
    hparams: dict[str, Any] = field(default_factory=dict)
    # The network the run fine-tuned: {"weights": WeightsRecord.as_dict() (source, timm model and
    # tag, file path and sha256), "freeze_bn": bool}. Records from before it was kept have {}.
    backbone: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The identity as JSON writes it: a ``results.jsonl`` line's fields besides ``step`` and
        ``accuracy``, and ``summary.json``'s ``run``."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunIdentity:
        """The identity in a mapping :meth:`as_dict` wrote (other keys are ignored); a field with
        a default may be missing, from files written before it existed."""
        fields = cls.__dataclass_fields__
        identity = {
            name: data[name] for name, spec in fields.items() if name in data or spec.default_factory is MISSING
        }
        for name in ("domains", "train_domains", "test_domains"):
            identity[name] = tuple(identity[name])
        return cls(**identity)

    @property
    def held_out(self) -> str:
        """The domains that tell runs of one configuration apart: ``test=<targets>`` under
        leave-one-domain-out, ``train=<source>`` under single-domain generalization."""
        if self.protocol == "sdg":
            return "train=" + "+".join(self.train_domains)
        return "test=" + "+".join(self.test_domains)

    @property
    def name(self) -> str:
        """``dataset/algorithm/optimizer/<held out>/seed<trial>/hparams<draw>`` (the W&B run name)."""
        return (
            f"{self.dataset}/{self.algorithm}/{self.optimizer}/{self.held_out}/"
            f"seed{self.trial_seed}/hparams{self.hparams_seed}"
        )


@dataclass(frozen=True)
class Record:
    """One validation of one run, read back from its ``results.jsonl``."""

    run: RunIdentity
    step: int
    accuracy: dict[str, dict[str, float]]
    run_dir: str

    def acc(self, domain: str, split: str) -> float | None:
        """Accuracy on the ``split`` ("in" or "out") of ``domain``, or None if not evaluated."""
        return self.accuracy.get(domain, {}).get(split)

    @classmethod
    def from_json(cls, line: dict[str, Any], run_dir: str) -> Record:
        return cls(RunIdentity.from_dict(line), int(line["step"]), line["accuracy"], run_dir)


def record_line(identity: RunIdentity, step: int, accuracy: dict[str, dict[str, float]]) -> str:
    """One line of ``results.jsonl``."""
    return json.dumps({"step": step, **identity.as_dict(), "accuracy": accuracy}, sort_keys=False)


@dataclass(frozen=True)
class BadLine:
    """A line of a ``results.jsonl`` that is not a record (cut short by a crash, edited...)."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def read_run(path: Path, run_dir: str, bad_lines: list[BadLine] | None = None) -> list[Record]:
    """The records of one ``results.jsonl``, one per step (the last written wins), by step.

    A line that is not a record (a last line a kill cut short...) is skipped and, when
    ``bad_lines`` is given, appended to it."""
    by_step: dict[int, Record] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = Record.from_json(json.loads(line), run_dir)
        except json.JSONDecodeError as err:
            if bad_lines is not None:
                bad_lines.append(BadLine(path, number, f"not JSON ({err.msg} at column {err.colno})"))
            continue
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if bad_lines is not None:
                what = f"no {err.args[0]!r}" if isinstance(err, KeyError) else str(err)
                bad_lines.append(BadLine(path, number, f"not a record ({what})"))
            continue
        by_step[record.step] = record
    return [by_step[step] for step in sorted(by_step)]


def load_records(root: Path, bad_lines: list[BadLine] | None = None) -> list[Record]:
    """Every record of every run under ``root`` (any depth), in run-directory and step order;
    lines that are not records are skipped (and listed in ``bad_lines``)."""
    records: list[Record] = []
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        records.extend(read_run(path, str(path.parent.relative_to(root)), bad_lines))
    return records
