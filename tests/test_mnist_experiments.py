"""The DomainBed MNIST experiments and the equal-budget optimizer comparison, as composed."""

from __future__ import annotations

import itertools

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from genie_dg.conf import CONFIG_DIR
from genie_dg.sweep import sample_hparams, search_specs

CONF = CONFIG_DIR


def hydra_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def swept_values(cfg) -> dict[str, list]:
    """Each swept key and its values, in the order the basic sweeper nests them (first slowest)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    return {o.key_or_group: list(o.sweep_iterator()) for o in parsed}


@pytest.mark.parametrize(
    ("experiment", "targets"),
    [
        ("domainbed_rotated_mnist", ["rot0", "rot15", "rot30", "rot45", "rot60", "rot75"]),
        ("domainbed_colored_mnist", ["plus90", "plus80", "minus90"]),
    ],
)
def test_domainbed_experiments_follow_its_protocol(experiment, targets):
    cfg = hydra_config(f"experiment={experiment}")
    assert cfg.dataset.dataset.source == "full"
    assert cfg.backbone._target_ == "genie_dg.models.MnistCNN"
    assert cfg.algorithm._target_.endswith("ERM")
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.optimizer.lr == pytest.approx(1e-3) and cfg.optimizer.weight_decay == 0
    assert cfg.dataset.batch_size == 64 and cfg.dataset.holdout_fraction == 0.2
    assert cfg.trainer.max_steps == 5000 and cfg.trainer.val_check_interval == 100
    assert cfg.dataset.target_holdout is True and cfg.hparams_seed == 0
    assert cfg.hydra.sweep.dir.endswith(f"sweeps/{experiment}")
    swept = swept_values(cfg)
    assert swept["dataset.test_domains"] == [[t] for t in targets] and swept["trial_seed"] == [0, 1, 2]


def test_domainbed_experiment_with_genie_keeps_genies_digit_defaults():
    cfg = hydra_config("experiment=domainbed_rotated_mnist", "optimizer=genie")
    assert cfg.optimizer._target_ == "genie_dg.optim.GENIE" and cfg.optimizer.lr == pytest.approx(0.5)


def test_equal_budget_gives_every_optimizer_the_same_random_search():
    cfg = hydra_config("experiment=equal_budget")
    swept = swept_values(cfg)
    assert list(swept) == ["trial_seed", "hparams_seed", "dataset.test_domains", "optimizer"], "optimizer fastest"
    assert swept["optimizer"] == ["genie", "adam", "sgd", "sam"]
    assert swept["trial_seed"] == [0, 1] and swept["hparams_seed"] == [1, 2, 3, 4, 5, 6], "random draws only"
    assert swept["dataset.test_domains"] == [["rot0"], ["rot75"]]
    assert cfg.dataset.dataset.source == "bundled" and cfg.trainer.max_steps == 300
    assert cfg.hydra.sweep.dir.endswith("sweeps/equal_budget")
    for optimizer, hparams_seed in itertools.product(swept["optimizer"], (1, 6)):
        job = hydra_config("experiment=equal_budget", f"optimizer={optimizer}", f"hparams_seed={hparams_seed}")
        specs = search_specs(job, "optimizer")
        default_lr = job.optimizer.lr
        drawn = sample_hparams(job)
        assert "optimizer.lr" in drawn and drawn["optimizer.lr"] != default_lr, "every optimizer searches its lr"
        assert set(drawn) == {f"optimizer.{name}" for name in specs}
