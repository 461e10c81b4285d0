"""A run's ``summary.json`` embeds its identity (the one its records carry) under ``run``; a
summary written before that (the same keys at the top level) still prints the same table."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from genie_dg.data import EvalSet
from genie_dg.reporting import print_summary, summarize, summary_run
from genie_dg.results.records import Record, RunIdentity, record_line

IDENTITY = RunIdentity(
    dataset="rotated_mnist",
    protocol="lodo",
    algorithm="ERM",
    optimizer="GENIE",
    domains=("rot0", "rot15", "rot30"),
    train_domains=("rot15", "rot30"),
    test_domains=("rot0",),
    trial_seed=1,
    hparams_seed=2,
    seed=1,
    hparams={"optimizer.lr": 0.0123},
    backbone={"weights": {"source": "random", "model": "MNIST_CNN"}, "freeze_bn": False},
)
EVAL_SETS = [EvalSet("rot15", False), EvalSet("rot30", False), EvalSet("rot0", True)]
METRICS = {
    "test/rot15/acc": 0.9,
    "test/rot30/acc": 0.8,
    "test/rot0/acc": 0.5,
    "test/source_acc": 0.85,
    "test/target_acc": 0.5,
}


def _summary(tmp_path: Path) -> dict:
    datamodule = SimpleNamespace(eval_sets=EVAL_SETS)
    trainer = SimpleNamespace(loggers=[], global_step=4)
    return summarize(IDENTITY, datamodule, METRICS, "", tmp_path, trainer)


def test_the_summary_embeds_the_identity_its_records_carry(tmp_path):
    summary = json.loads(json.dumps(_summary(tmp_path)))
    assert list(summary) == ["run", "steps", "source_acc", "target_acc", "domains", "files"]
    line = json.loads(record_line(IDENTITY, 4, {"rot0": {"in": 0.5}}))
    assert summary["run"] == {k: v for k, v in line.items() if k not in ("step", "accuracy")}
    assert RunIdentity.from_dict(summary["run"]) == IDENTITY
    assert Record.from_json(line, "run").run == IDENTITY
    assert summary["domains"] == [
        {"domain": "rot15", "role": "source", "accuracy": 0.9},
        {"domain": "rot30", "role": "source", "accuracy": 0.8},
        {"domain": "rot0", "role": "target", "accuracy": 0.5},
    ]


def test_a_summary_of_the_earlier_flat_layout_prints_the_same_table(tmp_path, capsys):
    summary = _summary(tmp_path)
    flat = {key: value for key, value in summary.items() if key != "run"}
    flat.update({key: summary["run"][key] for key in ("dataset", "algorithm", "optimizer", "seed", "trial_seed")})
    assert summary_run(flat)["optimizer"] == summary_run(summary)["optimizer"] == "GENIE"
    print_summary(summary)
    printed = capsys.readouterr().out
    print_summary(flat)
    assert capsys.readouterr().out == printed
    assert "rotated_mnist | ERM + GENIE | 4 steps | seed 1" in printed
