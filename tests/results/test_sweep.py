"""Random hyper-parameter draws (DomainBed's rule), run keys, and the Optuna search space."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from genie_dg.conf import CONFIG_DIR
from genie_dg.errors import UserInputError
from genie_dg.run_dir import run_key
from genie_dg.sweep import draw, optuna_space, sample_hparams, seed_hash


def test_hparams_seed_zero_keeps_the_defaults(make_config):
    cfg = make_config("optimizer=genie", "algorithm=coral", "dataset=pacs")
    assert sample_hparams(cfg) == {
        "algorithm.mmd_gamma": 1.0,
        "optimizer.lr": 0.015,
        "optimizer.beta": 0.95,
        "optimizer.p": 0.4,
        "backbone.drop_rate": 0.0,
        "dataset.batch_size": 32,
    }
    assert cfg.optimizer.lr == 0.015


@pytest.mark.slow  # composes 29 configs
def test_draws_follow_the_search_distributions_and_replace_the_config_values(make_config):
    for hparams_seed in range(1, 30):
        cfg = make_config("optimizer=genie", "algorithm=coral", "dataset=pacs", f"hparams_seed={hparams_seed}")
        drawn = sample_hparams(cfg)
        assert 1e-3 <= drawn["optimizer.lr"] <= 1e-1 and cfg.optimizer.lr == drawn["optimizer.lr"]
        assert 0.9 <= drawn["optimizer.beta"] <= 0.999
        assert 0.1 <= drawn["optimizer.p"] <= 0.8
        assert 0.1 <= drawn["algorithm.mmd_gamma"] <= 10
    assert cfg.optimizer.seed == cfg.seed, "interpolations outside the search stay intact"


def test_each_distribution():
    assert draw({"dist": "uniform", "low": 2, "high": 3}, 7, "x") == 2 + np.random.RandomState(7).uniform()
    values = {draw({"dist": "pow2_uniform", "low": 3, "high": 9, "int": True}, s, "x") for s in range(200)}
    assert all(isinstance(v, int) and 8 <= v < 512 for v in values) and len(values) > 50
    logs = [math.log10(draw({"dist": "log10_uniform", "low": -5, "high": -3}, s, "x")) for s in range(200)]
    assert min(logs) >= -5 and max(logs) <= -3 and min(logs) < -4.8 and max(logs) > -3.2
    picks = [draw({"dist": "choice", "values": [0.01, "a", 3]}, s, "x") for s in range(50)]
    assert set(picks) == {0.01, "a", 3} and {type(p) for p in picks} == {float, str, int}
    with pytest.raises(UserInputError, match=r"x.dist='normal'"):
        draw({"dist": "normal", "low": 0, "high": 1}, 0, "x")


def test_a_draw_depends_only_on_its_seeds_and_name(make_config):
    """Adding a hyper-parameter to a search, or changing the target domain, leaves the others' draws."""
    base = make_config("optimizer=adam", "hparams_seed=3", "trial_seed=1")
    other_target = make_config("optimizer=adam", "hparams_seed=3", "trial_seed=1", "dataset.test_domains=[rot45]")
    extended = make_config("optimizer=adam", "hparams_seed=3", "trial_seed=1")
    with open_dict(extended):
        extended.optimizer.extra = 0.5
        extended.optimizer.search.extra = {"dist": "uniform", "low": 0.0, "high": 1.0}
    drawn, moved, more = sample_hparams(base), sample_hparams(other_target), sample_hparams(extended)
    assert drawn == moved
    assert {k: more[k] for k in drawn} == drawn and "optimizer.extra" in more
    assert drawn != sample_hparams(make_config("optimizer=adam", "hparams_seed=3", "trial_seed=2"))
    assert drawn != sample_hparams(make_config("optimizer=adam", "hparams_seed=4", "trial_seed=1"))
    # DomainBed's seeding: the generator of "optimizer.lr" is seeded by hash(hash(hparams, trial), name).
    spec = base.optimizer.search.lr
    assert drawn["optimizer.lr"] == draw(spec, seed_hash(seed_hash(3, 1), "optimizer.lr"), "")


def test_a_searched_name_without_a_default_is_refused(make_config):
    cfg = make_config("optimizer=adam", "hparams_seed=1")
    with open_dict(cfg):
        cfg.optimizer.search.momentum = {"dist": "uniform", "low": 0, "high": 1}
    with pytest.raises(UserInputError, match="optimizer.search.momentum: optimizer has no default 'momentum'"):
        sample_hparams(cfg)


def test_run_key_ignores_where_files_go_and_sees_what_a_run_computes(make_config, tmp_path):
    cfg = make_config()
    key = run_key(cfg)
    assert len(key) == 12 and key == run_key(make_config())
    moved = make_config("logger=csv")
    with open_dict(moved):
        moved.paths.output_dir = str(tmp_path / "elsewhere")
        moved.paths.log_dir = "/somewhere/else"
    assert run_key(moved) == key
    for override in (
        "trial_seed=1",
        "hparams_seed=1",
        "optimizer.lr=0.1",
        "dataset.test_domains=[rot15]",
        "algorithm=coral",
    ):
        assert run_key(make_config(override)) != key, override


def test_optuna_space_translates_every_search_mapping(make_config):
    space = optuna_space(make_config("optimizer=fad", "algorithm=coral", "dataset=pacs"))
    assert space["optimizer.lr"] == f"tag(log, interval({10**-5!r}, {10**-3.5!r}))"
    assert space["optimizer.alpha"] == "interval(0.0, 1.0)"
    assert space["optimizer.rho"] == "choice(0.01, 0.02, 0.05, 0.1)"
    assert space["algorithm.mmd_gamma"] == "tag(log, interval(0.1, 10.0))"
    cfg = OmegaConf.create(
        {
            "dataset": {
                "batch_size": 32,
                "search": {"batch_size": {"dist": "pow2_uniform", "low": 3, "high": 9, "int": True}},
            }
        }
    )
    assert optuna_space(cfg) == {"dataset.batch_size": "int(tag(log, interval(8.0, 512.0)))"}


def _hydra_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_hparams_search_optuna_maximises_over_the_configs_search_mappings():
    cfg = _hydra_config("hparams_search=optuna", "optimizer=sgd", "algorithm=coral", "dataset=pacs")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert (
        OmegaConf.to_container(sweeper, resolve=True)["params"]
        == optuna_space(cfg)
        == {
            "algorithm.mmd_gamma": "tag(log, interval(0.1, 10.0))",
            "optimizer.lr": "tag(log, interval(0.001, 0.1))",
            "optimizer.weight_decay": f"tag(log, interval({1e-6!r}, 0.01))",
            "backbone.drop_rate": "choice(0.0, 0.1, 0.5)",
            "dataset.batch_size": f"int(tag(log, interval(8.0, {2**5.5!r})))",
        }
    )


def test_slurm_launcher_asks_for_a_gpu_per_task_and_multiruns_name_jobs_by_config():
    cfg = _hydra_config("hydra/launcher=slurm")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (cfg.hydra.launcher.gpus_per_task, cfg.hydra.launcher.tasks_per_node) == (1, 1)
    assert cfg.hydra.sweep.subdir == run_key(cfg), "the job directory is the job config's hash"


CONF = CONFIG_DIR
SWEEP_EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("sweep_*.yaml"))


def _domain_names(cfg) -> list[str]:
    from genie_dg.data.mnist import COLOR_FLIP_PROBABILITIES, ROTATIONS

    listed = cfg.dataset.dataset.get("domains")
    if listed is not None:
        return list(listed)
    return {
        "genie_dg.data.rotated_mnist": [f"rot{r}" for r in ROTATIONS],
        "genie_dg.data.colored_mnist": list(COLOR_FLIP_PROBABILITIES),
    }[cfg.dataset.dataset._target_]


def test_every_named_dataset_has_a_sweep_experiment():
    # image_folder is any tree of the user's: its domains are not known in advance.
    datasets = {p.stem for p in (CONF / "dataset").glob("*.yaml")} - {"image_folder"}
    assert {f"sweep_{name}" for name in datasets} == set(SWEEP_EXPERIMENTS)


@pytest.mark.parametrize("experiment", SWEEP_EXPERIMENTS)
def test_a_dataset_sweep_covers_every_target_and_every_pair_as_domainbed_does(experiment):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _hydra_config(f"experiment={experiment}")
    dataset = experiment.removeprefix("sweep_")
    assert cfg.hydra.sweep.dir.endswith(f"sweeps/{dataset}"), "each dataset's sweep has its own directory"
    assert cfg.dataset.target_holdout is True, "oracle selection needs the targets' held-out parts"
    names = _domain_names(cfg)
    sweeps = {
        override.key_or_group: list(override.sweep_iterator())
        for override in OverridesParser.create().parse_overrides(
            [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
        )
    }
    targets = [
        frozenset(names[d] if isinstance(d, int) else d for d in entry) for entry in sweeps["dataset.test_domains"]
    ]
    singles = {frozenset([name]) for name in names}
    pairs = {frozenset(pair) for pair in itertools.combinations(names, 2)}
    assert sorted(targets, key=sorted) == sorted(singles | pairs, key=sorted), "each target once"
    assert sweeps["trial_seed"] == [0, 1, 2] and sweeps["hparams_seed"] == list(range(20))
    if cfg.dataset.dataset.get("domains") is not None:
        # Image datasets: the GENIE authors fine-tune ImageNet weights for 5,000 steps (DomainNet 15,000).
        steps = 15000 if dataset == "domain_net" else 5000
        assert cfg.backbone.pretrained is True and cfg.trainer.max_steps == steps


@pytest.mark.e2e  # a fresh interpreter
def test_composing_hparams_search_optuna_needs_only_the_explicit_resolver_registration(tmp_path):
    """As in a notebook: a fresh interpreter, Hydra's compose API, no genie_dg module but the
    resolvers imported (they used to exist only as a side effect of importing genie_dg.sweep)."""
    import subprocess
    import sys

    script = f"""
from hydra import compose, initialize_config_dir
from genie_dg.resolvers import register_resolvers

register_resolvers()
with initialize_config_dir(config_dir={str(CONFIG_DIR)!r}, version_base="1.3"):
    cfg = compose("train", overrides=["hparams_search=optuna", "optimizer=sgd"], return_hydra_config=True)
print(sorted(cfg.hydra.sweeper.params))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'optimizer.lr'" in result.stdout
