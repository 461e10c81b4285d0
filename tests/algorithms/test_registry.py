"""Every DG method has exactly one config, and every config builds its method; the seam that
manually optimized methods get from the training loop."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch import nn

import genie_dg.algorithms as algorithms
from genie_dg.algorithms import DGAlgorithm, StepContext
from genie_dg.conf import CONFIG_DIR

CONF = CONFIG_DIR / "algorithm"
CONFIGS = sorted(CONF.glob("*.yaml"))


def test_every_exported_method_has_one_config():
    exported = {
        name
        for name in algorithms.__all__
        if isinstance(getattr(algorithms, name), type) and issubclass(getattr(algorithms, name), DGAlgorithm)
    } - {"DGAlgorithm"}
    targets = [OmegaConf.load(path)._target_.rsplit(".", 1)[1] for path in CONFIGS]
    assert sorted(targets) == sorted(exported)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_its_method_with_declared_search_space(path):
    cfg = OmegaConf.load(path)
    cls = get_class(cfg._target_)
    assert issubclass(cls, DGAlgorithm) and cfg._partial_
    assert "search" in cfg, f"{path.name} declares no search distribution"
    unknown = set(cfg.search) - set(cfg)
    assert not unknown, f"{path.name} searches hyper-parameters it does not set: {unknown}"
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if not k.startswith("_") and k != "search"}
    method = cls(num_classes=3, num_domains=3, num_features=8, input_shape=(3, 16, 16), **kwargs)
    assert int(method.update_count) == 0


def test_step_context_names_its_one_optimizer_and_refuses_to_guess_among_several():
    network = nn.Linear(2, 2)
    adam = torch.optim.Adam(network.parameters())
    assert StepContext(network, [adam], torch.Tensor.backward).optimizer is adam
    pair = StepContext(network, [adam, torch.optim.SGD(network.parameters(), lr=0.1)], torch.Tensor.backward)
    with pytest.raises(ValueError, match="2 optimizers, not one"):
        pair.optimizer  # noqa: B018 (the property raises)
