from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from genie_dg.errors import UserInputError
from genie_dg.models import create_backbone

NARROW = {"channels": (8, 16, 32, 64)}


def test_backbone_is_a_timm_feature_extractor():
    net = create_backbone("resnet18", in_chans=2, **NARROW)
    assert net.num_features == 64
    assert net(torch.randn(3, 2, 28, 28)).shape == (3, 64)


def test_local_weights_file_loads_and_drops_the_classifier(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=1000, **NARROW)
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    net = create_backbone("resnet18", weights=str(path), **NARROW)
    loaded = net.state_dict()
    assert not any(k.startswith("fc.") and v.numel() for k, v in loaded.items())
    assert torch.equal(loaded["conv1.weight"], source.state_dict()["conv1.weight"])
    assert torch.equal(loaded["layer4.1.bn2.running_var"], source.state_dict()["layer4.1.bn2.running_var"])


def test_missing_weights_file_names_the_fix(tmp_path):
    with pytest.raises(UserInputError, match="backbone.weights=.*no such file"):
        create_backbone("resnet18", weights=str(tmp_path / "nope.pth"))


def test_pretrained_without_cache_or_hub_fails_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(UserInputError, match="backbone.weights=.*backbone.pretrained=false"):
        create_backbone("resnet18", pretrained=True)
    assert time.perf_counter() - start < 20, "must not wait for timm's download retries"


def test_pretrained_uses_weights_from_the_local_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    torch.manual_seed(3)
    source = timm.create_model("resnet18", **NARROW)
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    net = create_backbone("resnet18", pretrained=True, **NARROW)
    assert torch.equal(net.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])


def test_unknown_backbone_name_is_a_clear_error():
    with pytest.raises(UserInputError, match="not a timm model"):
        create_backbone("resnet18x")
