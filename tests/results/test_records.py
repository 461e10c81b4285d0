"""Targets' held-out parts (DomainBed's "out" split) and how evaluations become record accuracies."""

from __future__ import annotations

from genie_dg.data import EvalSet
from genie_dg.pipeline import build, instantiate_or_explain
from genie_dg.results.recorder import split_accuracies


def _datamodule(make_config, *overrides):
    datamodule = instantiate_or_explain(make_config(*overrides).dataset)
    datamodule.setup()
    return datamodule


def test_by_default_targets_are_evaluated_whole(make_config):
    dm = _datamodule(make_config)
    assert [s.name for s in dm.eval_sets] == ["rot15", "rot30", "rot45", "rot60", "rot75", "rot0"]
    assert not any(s.is_target_validation for s in dm.eval_sets)
    assert list(dm.target_parts[0].indices) == list(range(834)) and dm.target_holdout_parts == []
    assert len(dm.val_dataloader()) == 6


def test_target_holdout_splits_each_target_like_a_training_domain(make_config):
    dm = _datamodule(make_config, "+dataset.target_holdout=true", "dataset.test_domains=[rot0,rot30]")
    assert [s.name for s in dm.eval_sets] == [
        "rot15",
        "rot45",
        "rot60",
        "rot75",
        "rot0",
        "rot30",
        "rot0/out",
        "rot30/out",
    ]
    assert [s.is_target for s in dm.eval_sets] == [False] * 4 + [True] * 4
    assert len(dm.val_dataloader()) == len(dm.test_dataloader()) == 8
    for kept, held_out in zip(dm.target_parts, dm.target_holdout_parts, strict=True):
        assert not set(kept.indices) & set(held_out.indices)
        assert len(kept) + len(held_out) == len(kept.base)
        assert len(held_out) == int(len(kept.base) * 0.2)
    # rot30's held-out part is the one it has as a training domain: one split rule for every domain.
    as_source = _datamodule(make_config, "dataset.test_domains=[rot0]")
    assert dm.target_holdout_parts[1].indices == as_source.holdout_parts[1].indices


def test_split_accuracies_name_the_splits_as_domainbed():
    sets = [EvalSet("B", False), EvalSet("A", True), EvalSet("A", True, is_target_validation=True)]
    metrics = {"val/B/acc": 0.5, "val/A/acc": 0.25, "val/A/out/acc": 0.75, "test/B/acc": 0.0}
    assert split_accuracies(sets, metrics, "val") == {"B": {"out": 0.5}, "A": {"in": 0.25, "out": 0.75}}


def test_the_target_mean_leaves_out_the_targets_held_out_part(small_run, make_config):
    cfg = make_config(*small_run, "+dataset.target_holdout=true", "+trainer.fast_dev_run=true")
    datamodule, model, trainer, _ = build(cfg)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = trainer.callback_metrics
    assert metrics["val/target_acc"] == metrics["val/rot0/acc"]
    sources = [metrics[f"val/rot{angle}/acc"] for angle in (15, 30, 45, 60, 75)]
    assert abs(float(metrics["val/source_acc"]) - float(sum(sources)) / 5) < 1e-6
