"""DG protocols: leave-one-domain-out and single-domain generalization, per run and in sweeps."""

from __future__ import annotations

import multiprocessing

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from genie_dg.data import MultiDomainDataModule, rotated_mnist
from genie_dg.errors import UserInputError
from genie_dg.pipeline import instantiate_or_explain


@pytest.fixture(scope="module")
def digits():
    return rotated_mnist()


def _setup(data, **kwargs) -> MultiDomainDataModule:
    dm = MultiDomainDataModule(lambda: data, **kwargs)
    dm.setup()
    return dm


def test_sdg_trains_and_validates_on_one_domain_and_tests_on_every_other(digits):
    dm = _setup(digits, protocol="sdg", train_domains=["rot30"], test_domains=None, batch_size=4)
    assert dm.train_domains == [2] and dm.test_domains == [0, 1, 3, 4, 5]
    assert [(s.domain, s.is_target) for s in dm.eval_sets] == [
        ("rot30", False),
        ("rot0", True),
        ("rot15", True),
        ("rot45", True),
        ("rot60", True),
        ("rot75", True),
    ]
    train, holdout = dm.train_parts[0], dm.holdout_parts[0]
    assert len(train) + len(holdout) == len(digits.domains[2])
    assert not set(train.indices) & set(holdout.indices)
    (batch,) = next(iter(dm.train_dataloader()))
    assert batch.domain == 2 and len(batch.y) == 4


def test_lodo_trains_on_every_domain_outside_the_targets(digits):
    dm = _setup(digits, protocol="lodo", test_domains=["rot0", 5])
    assert dm.train_domains == [1, 2, 3, 4] and dm.test_domains == [0, 5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": "sdg", "train_domains": [0, 1], "test_domains": None}, "exactly one domain"),
        ({"protocol": "sdg", "train_domains": None, "test_domains": None}, "exactly one domain"),
        ({"protocol": "sdg", "train_domains": [0], "test_domains": [1]}, "test_domains must stay null"),
        ({"protocol": "lodo", "train_domains": [0]}, "train_domains must stay null"),
        ({"protocol": "loo"}, "choose protocol=lodo or protocol=sdg"),
        ({"protocol": "sdg", "train_domains": ["rot90"], "test_domains": None}, "unknown domain 'rot90'"),
    ],
)
def test_protocol_mistakes_are_user_errors_that_name_the_fix(digits, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        _setup(digits, **kwargs)


def _datamodule(make_config, *overrides: str) -> MultiDomainDataModule:
    dm = instantiate_or_explain(make_config(*overrides).dataset)
    dm.setup()
    return dm


def test_protocol_is_a_config_group_that_keeps_each_dataset_default(make_config):
    colored = _datamodule(make_config, "dataset=colored_mnist")
    assert colored.protocol == "lodo"
    assert [colored.dataset.domain_names[d] for d in colored.test_domains] == ["minus90"]
    single = _datamodule(make_config, "dataset=colored_mnist", "protocol=sdg", "dataset.train_domains=[plus80]")
    assert single.protocol == "sdg"
    assert [single.dataset.domain_names[d] for d in single.test_domains] == ["plus90", "minus90"]


def test_a_sweep_over_source_domains_composes_one_sdg_run_per_domain(make_config):
    # What `python train.py -m protocol=sdg dataset.train_domains=[0],[rot15],[2]` expands to.
    (sweep,) = OverridesParser.create().parse_overrides(["dataset.train_domains=[0],[rot15],[2]"])
    jobs = [f"{sweep.key_or_group}={value}" for value in sweep.sweep_string_iterator()]
    assert jobs == ["dataset.train_domains=[0]", "dataset.train_domains=[rot15]", "dataset.train_domains=[2]"]
    trained_on = [_datamodule(make_config, "protocol=sdg", job).train_domains for job in jobs]
    assert trained_on == [[0], [1], [2]]
    for protocol in ("lodo", "sdg"):
        assert make_config(f"protocol={protocol}").dataset.protocol == protocol


def test_the_training_stream_of_every_domain_runs_on_num_workers_processes_in_total(digits):
    dm = _setup(digits, test_domains=[0], batch_size=2, num_workers=2)
    before = set(multiprocessing.active_children())
    batches = iter(dm.train_dataloader())
    assert [b.domain for b in next(batches)] == [1, 2, 3, 4, 5]
    started = set(multiprocessing.active_children()) - before
    assert len(started) == 2, "one loader for all five domains (DomainBed starts 8 per domain)"
