"""DomainBed's three model selection methods on hand-built records."""

from __future__ import annotations

import pytest

from genie_dg.results.selection import (
    GroupKey,
    IIDAccuracySelectionMethod,
    LeaveOneOutSelectionMethod,
    OracleSelectionMethod,
    group_records,
)

from helpers.records_factory import lodo_record, make_record

IID, LOO, ORACLE = IIDAccuracySelectionMethod, LeaveOneOutSelectionMethod, OracleSelectionMethod


def test_training_domain_validation_takes_the_best_step_of_the_best_draw():
    records = [
        # draw 0: best source validation at step 2 (0.70), whose target accuracy is 0.30
        lodo_record(1, source_out=0.60, target_in=0.90),
        lodo_record(2, source_out=0.70, target_in=0.30),
        lodo_record(3, source_out=0.65, target_in=0.95),
        # draw 1: best at step 1 (0.80): the sweep's pick
        lodo_record(1, source_out=0.80, target_in=0.55, hparams_seed=1),
        lodo_record(2, source_out=0.50, target_in=0.99, hparams_seed=1),
    ]
    choice = IID.sweep_acc(records)
    assert (choice.val_acc, choice.test_acc, choice.step) == (0.80, 0.55, 1)
    assert choice.run_dir.endswith("-h1")
    assert IID.run_acc(records[:3]).test_acc == 0.30


def test_training_domain_validation_averages_the_held_out_parts_of_the_training_domains():
    record = make_record(5, {"A": {"in": 0.4}, "B": {"out": 0.6}, "C": {"out": 0.9}})
    assert IID.run_acc([record]).val_acc == pytest.approx(0.75)


def test_training_domain_validation_ignores_runs_with_two_targets_and_breaks_ties_early():
    pair = lodo_record(1, source_out=1.0, target_in=1.0, test=("A", "B"))
    first, later = lodo_record(1, 0.7, 0.2), lodo_record(2, 0.7, 0.9)
    tied_draw = lodo_record(1, 0.7, 0.5, hparams_seed=3)
    choice = IID.sweep_acc([pair, tied_draw, later, first])
    assert (choice.step, choice.test_acc) == (1, 0.2), "lowest draw, then earliest step, wins a tie"


def test_oracle_takes_the_last_step_and_compares_draws_on_the_targets_held_out_part():
    records = [
        lodo_record(1, 0.9, target_in=0.99, target_out=0.99),
        lodo_record(2, 0.9, target_in=0.40, target_out=0.60),
        lodo_record(1, 0.1, target_in=0.10, target_out=0.10, hparams_seed=1),
        lodo_record(2, 0.1, target_in=0.70, target_out=0.65, hparams_seed=1),
    ]
    choice = ORACLE.sweep_acc(records)
    assert (choice.val_acc, choice.test_acc, choice.step) == (0.65, 0.70, 2)
    assert ORACLE.run_acc(records[:2]).test_acc == 0.40, "no early stopping"


def test_oracle_needs_the_targets_held_out_part():
    assert ORACLE.sweep_acc([lodo_record(1, 0.9, target_in=0.8)]) is None


def _loo_records(hparams_seed: int, step: int, test_in: float, b_in: float, c_in: float | None) -> list:
    """Target A's run and the pair runs (A,B) and (A,C) of one draw at one step."""
    records = [
        lodo_record(step, 0.5, target_in=test_in, hparams_seed=hparams_seed),
        make_record(
            step,
            {"C": {"out": 0.5}, "A": {"in": 0.1}, "B": {"in": b_in}},
            test=("A", "B"),
            hparams_seed=hparams_seed,
        ),
    ]
    if c_in is not None:
        records.append(
            make_record(
                step,
                {"B": {"out": 0.5}, "A": {"in": 0.1}, "C": {"in": c_in}},
                test=("A", "C"),
                hparams_seed=hparams_seed,
            )
        )
    return records


def test_leave_one_out_validates_on_each_other_domain_held_out_with_the_target():
    records = (
        _loo_records(0, 1, test_in=0.11, b_in=0.60, c_in=0.80)  # val 0.70
        + _loo_records(0, 2, test_in=0.22, b_in=0.90, c_in=0.90)  # val 0.90: draw 0's pick
        + _loo_records(1, 1, test_in=0.33, b_in=0.85, c_in=0.85)  # val 0.85
        # draw 1 at step 2 would win (0.95) but lacks its (A, C) run: no pick at that step
        + _loo_records(1, 2, test_in=0.44, b_in=0.95, c_in=None)
    )
    choice = LOO.sweep_acc(records)
    assert (choice.val_acc, choice.test_acc, choice.step) == (pytest.approx(0.90), 0.22, 2)
    assert LOO.run_acc([r for r in records if r.run.hparams_seed == 1]).test_acc == 0.33


def test_leave_one_out_needs_every_pair_and_the_single_target_run():
    assert LOO.sweep_acc(_loo_records(0, 1, 0.5, 0.6, None)) is None
    assert LOO.sweep_acc(_loo_records(0, 1, 0.5, 0.6, 0.7)[1:]) is None


def test_a_run_with_two_targets_serves_the_groups_of_both():
    pair = lodo_record(1, 0.5, 0.5, test=("A", "B"))
    groups = group_records([pair, lodo_record(1, 0.5, 0.5)])
    key = GroupKey("toy", "lodo", "GENIE", "ERM", 0, "A")
    assert len(groups[key]) == 2
    assert groups[GroupKey("toy", "lodo", "GENIE", "ERM", 0, "B")] == [pair]


def test_single_domain_generalization_averages_the_targets_and_has_no_leave_one_out():
    sdg = dict(protocol="sdg", test=("B", "C"), train=("A",))
    records = [
        make_record(1, {"A": {"out": 0.9}, "B": {"in": 0.2, "out": 0.3}, "C": {"in": 0.4, "out": 0.5}}, **sdg),
        make_record(2, {"A": {"out": 0.8}, "B": {"in": 0.6, "out": 0.7}, "C": {"in": 0.8, "out": 0.9}}, **sdg),
    ]
    assert list(group_records(records)) == [GroupKey("toy", "sdg", "GENIE", "ERM", 0, "A")]
    iid, oracle = IID.sweep_acc(records), ORACLE.sweep_acc(records)
    assert (iid.step, iid.test_acc) == (1, pytest.approx(0.3))
    assert (oracle.step, oracle.val_acc, oracle.test_acc) == (2, pytest.approx(0.8), pytest.approx(0.7))
    assert LOO.sweep_acc(records) is None
