"""DomainBed's model selection methods (``domainbed/model_selection.py``), on our records.

Records are grouped as DomainBed's ``reporting.get_grouped_records`` does, by (dataset,
protocol, optimizer, algorithm, trial seed, column), a record joining the group of each of its
columns: under leave-one-domain-out the columns are its target domains (a run with two targets
serves leave-one-domain-out selection for both), under single-domain generalization its
training domain. Within a group, a method picks a step of each hyper-parameter draw
(:meth:`SelectionMethod.run_acc`), then the draw whose pick has the highest validation accuracy
(:meth:`SelectionMethod.sweep_acc`); the group's result is that pick's test accuracy.

- training-domain validation (``IIDAccuracySelectionMethod``): the step with the highest mean
  accuracy on the training domains' held-out parts; test accuracy on the target's "in" part;
- leave-one-domain-out cross-validation (``LeaveOneOutSelectionMethod``): the step whose mean,
  over every other domain, of the accuracy on that domain when it was the second target of a
  run with the same draw (its "in" part) is highest; needs, at that step, the run with the one
  target and a run for every pair (target, other domain); leave-one-domain-out protocol only;
- test-domain validation, oracle (``OracleSelectionMethod``): the last step (no early
  stopping), draws compared by the accuracy on the target's held-out "out" part (recorded when
  ``dataset.target_holdout=true``).

Under single-domain generalization (DomainBed has none) the same rules apply with "the target"
read as "the mean over all targets". Ties go to the lowest hyper-parameter seed and the earliest
step (DomainBed's order there follows its directory listing).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import fmean

from genie_dg.results.records import Record


@dataclass(frozen=True)
class Choice:
    """A selected (run, step): its validation accuracy (what was compared) and test accuracy."""

    val_acc: float
    test_acc: float
    step: int
    run_dir: str


@dataclass(frozen=True)
class GroupKey:
    """The records one selection is made over: one cell of one trial in a result table."""

    dataset: str
    protocol: str
    optimizer: str
    algorithm: str
    trial_seed: int
    column: str


def columns(record: Record) -> tuple[str, ...]:
    """The table columns a record counts for (see the module docstring)."""
    return record.run.train_domains if record.run.protocol == "sdg" else record.run.test_domains


def group_records(records: Iterable[Record]) -> dict[GroupKey, list[Record]]:
    groups: dict[GroupKey, list[Record]] = defaultdict(list)
    for record in records:
        run = record.run
        for column in columns(record):
            key = GroupKey(run.dataset, run.protocol, run.optimizer, run.algorithm, run.trial_seed, column)
            groups[key].append(record)
    return dict(groups)


def is_test_record(record: Record) -> bool:
    """DomainBed's ``get_test_records``: the runs with a single target (every SDG run)."""
    return record.run.protocol == "sdg" or len(record.run.test_domains) == 1


def _mean(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else fmean(values)


def _target_acc(record: Record, split: str) -> float | None:
    return _mean([record.acc(domain, split) for domain in record.run.test_domains])


class SelectionMethod:
    """Picks, among a group's records, a (hyper-parameter draw, step); see the module docstring."""

    key: str
    name: str
    protocols: tuple[str, ...] = ("lodo", "sdg")

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> Choice | None:
        """The pick among the records of one hyper-parameter draw, or None if it cannot pick."""
        raise NotImplementedError

    @classmethod
    def hparams_accs(cls, records: list[Record]) -> list[tuple[Choice, list[Record]]]:
        """Every draw's pick with its records, highest validation accuracy first."""
        by_draw: dict[int, list[Record]] = defaultdict(list)
        for record in records:
            by_draw[record.run.hparams_seed].append(record)
        picks = [(cls.run_acc(by_draw[seed]), by_draw[seed]) for seed in sorted(by_draw)]
        found = [(choice, group) for choice, group in picks if choice is not None]
        # sorted is stable: among equal validation accuracies the lowest seed stays first.
        return sorted(found, key=lambda pick: -pick[0].val_acc)

    @classmethod
    def sweep_acc(cls, records: list[Record]) -> Choice | None:
        """The group's selected (draw, step), or None when no draw allows a pick."""
        if records and records[0].run.protocol not in cls.protocols:
            return None
        ranked = cls.hparams_accs(records)
        return ranked[0][0] if ranked else None


def _argmax(choices: Iterable[Choice | None]) -> Choice | None:
    """The first choice with the highest validation accuracy (choices come in step order)."""
    best: Choice | None = None
    for choice in choices:
        if choice is not None and (best is None or choice.val_acc > best.val_acc):
            best = choice
    return best


def _by_step(records: Iterable[Record]) -> list[Record]:
    return sorted(records, key=lambda r: (r.step, r.run_dir))


class IIDAccuracySelectionMethod(SelectionMethod):
    """argmax over steps of the mean accuracy on the training domains' held-out parts."""

    key = "iid"
    name = "training-domain validation set"

    @classmethod
    def _step_acc(cls, record: Record) -> Choice | None:
        val = _mean([record.acc(domain, "out") for domain in record.run.train_domains])
        test = _target_acc(record, "in")
        return None if val is None or test is None else Choice(val, test, record.step, record.run_dir)

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> Choice | None:
        return _argmax(cls._step_acc(r) for r in _by_step(filter(is_test_record, run_records)))


class LeaveOneOutSelectionMethod(SelectionMethod):
    """argmax over steps of the mean accuracy on each other domain when it was held out too."""

    key = "loo"
    name = "leave-one-domain-out cross-validation"
    protocols = ("lodo",)

    @classmethod
    def _step_acc(cls, step_records: list[Record]) -> Choice | None:
        test_records = [r for r in step_records if is_test_record(r)]
        if len(test_records) != 1:
            return None
        test = test_records[0]
        test_domain = test.run.test_domains[0]
        val_accs: dict[str, float | None] = {}
        for record in step_records:
            if len(record.run.test_domains) == 2:
                (val_domain,) = set(record.run.test_domains) - {test_domain}
                val_accs[val_domain] = record.acc(val_domain, "in")
        others = [d for d in test.run.domains if d != test_domain]
        if any(val_accs.get(d) is None for d in others):
            return None
        test_acc = test.acc(test_domain, "in")
        if test_acc is None:
            return None
        return Choice(fmean(val_accs[d] for d in others), test_acc, test.step, test.run_dir)

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> Choice | None:
        by_step: dict[int, list[Record]] = defaultdict(list)
        for record in run_records:
            by_step[record.step].append(record)
        return _argmax(cls._step_acc(by_step[step]) for step in sorted(by_step))


class OracleSelectionMethod(SelectionMethod):
    """The last step; draws compared by accuracy on the target's held-out part."""

    key = "oracle"
    name = "test-domain validation set (oracle)"

    @classmethod
    def run_acc(cls, run_records: list[Record]) -> Choice | None:
        test_records = _by_step(filter(is_test_record, run_records))
        if not test_records:
            return None
        last = test_records[-1]
        val, test = _target_acc(last, "out"), _target_acc(last, "in")
        return None if val is None or test is None else Choice(val, test, last.step, last.run_dir)


SELECTION_METHODS: dict[str, type[SelectionMethod]] = {
    method.key: method for method in (IIDAccuracySelectionMethod, LeaveOneOutSelectionMethod, OracleSelectionMethod)
}
