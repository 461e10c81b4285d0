"""One source of truth per hyper-parameter: every default lies inside its own search range.

A default and its range live together (a group's config, or the dataset family's
``dataset_optimizer`` file where they differ, as DomainBed's registry does), so a sweep's draws
surround the value a single run uses. Checked for every configuration a user can compose.
"""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from genie_dg.conf import CONFIG_DIR
from genie_dg.sweep import search_specs, searched_groups

CONF = CONFIG_DIR
DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
ALGORITHMS = sorted(p.stem for p in (CONF / "algorithm").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def outside_range(value, spec) -> str | None:
    """Why ``value`` cannot be drawn from ``spec``, or None when it can."""
    dist = spec["dist"]
    if dist == "choice":
        return None if value in list(spec["values"]) else f"{value!r} not in {list(spec['values'])}"
    low, high = float(spec["low"]), float(spec["high"])
    if dist == "log10_uniform":
        if value == 0:
            # 0 switches a term off (weight decay); a log scale cannot hold it. DomainBed's
            # registry has the same rule: weight decay 0 by default, 10^U(-6,-2) when searched.
            return None
        position = math.log10(value)
    elif dist == "pow2_uniform":
        # int(2 ** U(low, high)) reaches every integer from int(2**low) to int(2**high).
        if spec.get("int", False):
            ok = int(2**low) <= value <= int(2**high)
            return None if ok else f"{value} outside [{int(2**low)}, {int(2**high)}]"
        position = math.log2(value)
    else:
        position = value
    return None if low <= position <= high else f"{value} outside {dist}({low}, {high})"


def defaults_outside_ranges(cfg) -> list[str]:
    problems = []
    for group in searched_groups(cfg):
        values = OmegaConf.to_container(cfg[group], resolve=True)
        for name, spec in search_specs(cfg, group).items():
            why = outside_range(values[name], spec)
            if why:
                problems.append(f"{group}.{name}: {why}")
    return problems


@pytest.mark.slow  # composes every optimizer on this dataset
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_optimizer_default_lies_in_its_range_on_every_dataset(make_config, dataset):
    overrides = ["dataset.dataset.root=/nonexistent"] if dataset == "image_folder" else []
    problems = {
        optimizer: defaults_outside_ranges(make_config(f"dataset={dataset}", f"optimizer={optimizer}", *overrides))
        for optimizer in OPTIMIZERS
    }
    assert {k: v for k, v in problems.items() if v} == {}


@pytest.mark.slow  # composes every algorithm and backbone
def test_every_algorithm_and_backbone_default_lies_in_its_range(make_config):
    problems = [p for a in ALGORITHMS for p in defaults_outside_ranges(make_config(f"algorithm={a}"))]
    problems += [p for b in BACKBONES for p in defaults_outside_ranges(make_config(f"backbone={b}"))]
    assert problems == []


@pytest.mark.slow  # composes each experiment
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_default_lies_in_its_range(make_config, experiment):
    assert defaults_outside_ranges(make_config(f"experiment={experiment}")) == []


def test_the_checker_sees_a_default_outside_its_range(make_config):
    cfg = make_config("optimizer=genie", "dataset=pacs", "optimizer.lr=0.5")
    assert defaults_outside_ranges(cfg) == ["optimizer.lr: 0.5 outside log10_uniform(-3.0, -1.0)"]
    cfg = make_config("dataset=pacs", "dataset.batch_size=64")
    assert defaults_outside_ranges(cfg) == ["dataset.batch_size: 64 outside [8, 45]"]


@pytest.mark.slow  # composes every optimizer twice
def test_digit_datasets_share_one_registry_per_optimizer(make_config):
    for optimizer in OPTIMIZERS:
        rotated = make_config("dataset=rotated_mnist", f"optimizer={optimizer}").optimizer
        colored = make_config("dataset=colored_mnist", f"optimizer={optimizer}").optimizer
        assert OmegaConf.to_container(rotated) == OmegaConf.to_container(colored), optimizer


def test_a_null_spec_switches_a_search_off(make_config):
    from genie_dg.sweep import sample_hparams

    cfg = make_config("dataset=rotated_mnist", "optimizer=adam", "hparams_seed=3")
    assert cfg.optimizer.search.weight_decay is None
    drawn = sample_hparams(cfg)
    assert "optimizer.weight_decay" not in drawn and cfg.optimizer.weight_decay == 0.0
    assert drawn["optimizer.lr"] != 1e-3 and 10**-4.5 <= drawn["optimizer.lr"] <= 10**-2.5
