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
:class:`genie_dg.results.recorder.ResultsRecorder` writes them; this module only reads and
writes the format, so ``genie-dg collect`` starts without importing Lightning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
        identity = {name: line[name] for name in RunIdentity.__dataclass_fields__}
        for name in ("domains", "train_domains", "test_domains"):
            identity[name] = tuple(identity[name])
        return cls(RunIdentity(**identity), int(line["step"]), line["accuracy"], run_dir)


def record_line(identity: RunIdentity, step: int, accuracy: dict[str, dict[str, float]]) -> str:
    """One line of ``results.jsonl``."""
    return json.dumps({"step": step, **asdict(identity), "accuracy": accuracy}, sort_keys=False)


def read_run(path: Path, run_dir: str) -> list[Record]:
    """The records of one ``results.jsonl``, one per step (the last written wins), by step."""
    by_step: dict[int, Record] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = Record.from_json(json.loads(line), run_dir)
            by_step[record.step] = record
    return [by_step[step] for step in sorted(by_step)]


def load_records(root: Path) -> list[Record]:
    """Every record of every run under ``root`` (any depth), in run-directory and step order."""
    records: list[Record] = []
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        records.extend(read_run(path, str(path.parent.relative_to(root))))
    return records
