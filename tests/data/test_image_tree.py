"""Reading DomainBed-layout image trees: labels, stray files, layout errors, corrupt images."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from genie_dg.data import DomainSubset, domain_image_folder
from genie_dg.data.image_folder import CorruptImageError
from genie_dg.errors import UserInputError
from genie_dg.pipeline import build, instantiate_or_explain

from helpers.trees import image_bytes, write_image, write_tree

WARNING_LOGGER = "genie_dg.data.image_folder"


def _labels(data, domain: str) -> list[int]:
    return sorted(y for _, y in data.domains[data.domain_names.index(domain)].samples)


def test_configured_classes_fix_the_label_indices_when_a_domain_lacks_a_class(make_tree):
    root = make_tree({"photo": {"dog": 1, "person": 2}, "sketch": {"giraffe": 1, "person": 1}})
    classes = ["dog", "elephant", "giraffe", "person"]
    data = domain_image_folder(root, "toy", domains=["sketch", "photo"], classes=classes, augment=False)
    assert data.domain_names == ["sketch", "photo"], "the config's order, not the disk's"
    assert data.classes == classes and data.num_classes == 4
    assert _labels(data, "photo") == [0, 3, 3]
    assert _labels(data, "sketch") == [2, 3]


def test_stray_files_and_hidden_folders_are_ignored_with_one_warning_listing_them(make_tree, caplog):
    root = make_tree({"art": {"dog": 2}, "photo": {"dog": 1, "horse": 1}})
    (root / "README.txt").write_text("about")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "photo" / "notes.txt").write_text("x")
    (root / "photo" / "dog" / "label.csv").write_text("x")
    (root / "photo" / "dog" / "._0.png").write_bytes(b"mac resource fork")
    write_image(root / "photo" / "dog" / ".thumbs" / "t.png")
    write_image(root / ".trash" / "dog" / "old.png")
    (root / "art" / "zebra").mkdir()  # an empty class folder
    with caplog.at_level(logging.WARNING, logger=WARNING_LOGGER):
        data = domain_image_folder(root, "toy", augment=False)
    messages = [r.getMessage() for r in caplog.records if r.name == WARNING_LOGGER]
    warnings = [m for m in messages if "ignored" in m]
    assert len(warnings) == 1
    assert "toy: domain 'art' has no image of 1 of the 2 classes: horse" in messages
    for ignored in (
        "README.txt",
        ".DS_Store",
        ".trash/",
        "photo/notes.txt",
        "photo/dog/label.csv",
        "photo/dog/._0.png",
        "photo/dog/.thumbs/",
        "art/zebra/",
    ):
        assert ignored in warnings[0]
    assert "ignored 8 path(s)" in warnings[0]
    assert data.domain_names == ["art", "photo"] and data.classes == ["dog", "horse"]
    assert [len(d) for d in data.domains] == [2, 2]


def test_images_in_nested_class_subfolders_count_as_imagefolder_counts_them(make_tree):
    root = make_tree({"art": {"dog": 1}})
    write_image(root / "art" / "dog" / "batch2" / "deep.jpg")
    data = domain_image_folder(root, "toy", augment=False)
    assert len(data.domains[0]) == 2


def test_an_empty_domain_is_a_user_error(make_tree):
    root = make_tree({"art": {"dog": 1}})
    (root / "photo" / "dog").mkdir(parents=True)
    (root / "photo" / "dog" / "readme.md").write_text("no images here")
    with pytest.raises(UserInputError, match="domain 'photo'.*contains no images"):
        domain_image_folder(root, "toy")


def test_a_domain_folder_that_does_not_match_the_config_names_both(make_tree):
    root = make_tree({"art_painting": {"dog": 1}, "sketches": {"dog": 1}})
    with pytest.raises(UserInputError, match=r"\['sketch'\] not found.*not in the config: \['sketches'\]"):
        domain_image_folder(root, "pacs", domains=["art_painting", "sketch"])


def test_a_class_folder_outside_the_configured_classes_is_a_user_error(make_tree):
    root = make_tree({"photo": {"dog": 1, "elefant": 1}})
    with pytest.raises(UserInputError, match=r"\['elefant'\] in .*photo are not among the 2 classes"):
        domain_image_folder(root, "pacs", domains=["photo"], classes=["dog", "elephant"])


def test_a_missing_root_setting_is_a_user_error():
    with pytest.raises(UserInputError, match=r"dataset.dataset.root is not set"):
        domain_image_folder(None)


def _truncate(path) -> None:
    """Replace ``path`` by the first half of a noisy PNG: a valid header, then the data stops."""
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_a_truncated_image_raises_an_error_naming_the_file_when_read(make_tree):
    root = make_tree({"photo": {"dog": 2}})
    bad = root / "photo" / "dog" / "00001.png"
    _truncate(bad)
    data = domain_image_folder(root, "toy", image_size=8, augment=False)
    data.domains[0][0]  # the intact image still reads
    with pytest.raises(CorruptImageError, match=rf"{bad}: cannot decode.*skip_corrupt=true"):
        data.domains[0][1]
    with pytest.raises(CorruptImageError, match="00001.png"):
        list(DataLoader(DomainSubset(data.domains[0], [0, 1], 0, data.eval_transform), batch_size=2))


@pytest.mark.e2e  # a DataLoader worker process
def test_a_corrupt_image_read_in_a_loader_worker_is_one_error_line(make_tree):
    root = make_tree({"photo": {"dog": 2}})
    bad = root / "photo" / "dog" / "00001.png"
    _truncate(bad)
    data = domain_image_folder(root, "toy", image_size=8, augment=False)
    loader = DataLoader(DomainSubset(data.domains[0], [0, 1], 0, data.eval_transform), batch_size=2, num_workers=1)
    with pytest.raises(CorruptImageError) as raised:
        list(loader)
    assert str(raised.value).startswith(f"{bad}: cannot decode this image")
    assert "\n" not in str(raised.value), "the worker's traceback is not part of the message"


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target, target_is_directory=target.is_dir())
    return path


def test_a_link_back_up_the_tree_is_not_followed_and_the_scan_says_so(make_tree, caplog):
    root = make_tree({"art": {"dog": 6, "horse": 3}, "photo": {"dog": 2, "horse": 2}})
    # Loops: a class folder linking back to its domain, another to the dataset root.
    _link(root / "art" / "dog" / "loop", root / "art")
    _link(root / "art" / "horse" / "again", root)
    with caplog.at_level(logging.WARNING, logger=WARNING_LOGGER):
        data = domain_image_folder(root, "toy", augment=False)
    assert [len(d) for d in data.domains] == [9, 4], "each image once, under its own label"
    assert _labels(data, "art") == [0] * 6 + [1] * 3
    (warning,) = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert "did not follow 2 symbolic link(s)" in warning
    assert "art/dog/loop -> art (a folder read where it is)" in warning
    assert "art/horse/again -> . (a folder read where it is)" in warning


def test_links_out_of_the_dataset_root_are_skipped_and_named(make_tree, tmp_path, caplog):
    root = make_tree({"art": {"dog": 2}, "photo": {"dog": 2}})
    outside = write_tree(tmp_path / "elsewhere", {"cartoon": {"dog": 5, "cat": 4}})
    _link(root / "cartoon", outside / "cartoon")  # a whole domain
    _link(root / "art" / "cat", outside / "cartoon" / "cat")  # a class folder
    _link(root / "photo" / "dog" / "extra.png", outside / "cartoon" / "dog" / "00000.png")  # a file
    _link(root / "photo" / "dog" / "inside.png", root / "art" / "dog" / "00000.png")  # a file inside: read
    with caplog.at_level(logging.WARNING, logger=WARNING_LOGGER):
        data = domain_image_folder(root, "toy", augment=False)
    assert data.domain_names == ["art", "photo"] and data.classes == ["dog"]
    assert [len(d) for d in data.domains] == [2, 3]
    (warning,) = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    for skipped in ("cartoon", "art/cat", "photo/dog/extra.png"):
        assert f"{skipped} -> {outside.resolve()}" in warning and "(outside the dataset root)" in warning
    assert "did not follow 3 symbolic link(s)" in warning


def test_skip_corrupt_leaves_unreadable_images_out_and_logs_how_many(make_tree, caplog):
    root = make_tree({"photo": {"dog": 3}, "art": {"dog": 2}})
    _truncate(root / "photo" / "dog" / "00000.png")
    (root / "art" / "dog" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING, logger=WARNING_LOGGER):
        data = domain_image_folder(root, "toy", image_size=8, augment=False, skip_corrupt=True)
    assert [len(d) for d in data.domains] == [2, 2]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 2 unreadable image(s)" in message
    assert "photo/dog/00000.png (image file is truncated" in message
    assert "art/dog/garbage.jpg (cannot identify image file" in message
    photo = data.domain_names.index("photo")
    loader = DataLoader(DomainSubset(data.domains[photo], [0, 1], photo, data.eval_transform), batch_size=4)
    assert len(next(iter(loader))[1]) == 2


def test_a_count_that_differs_from_the_config_warns(make_tree, caplog):
    root = make_tree({"photo": {"dog": 2, "horse": 1}})
    with caplog.at_level(logging.WARNING, logger=WARNING_LOGGER):
        domain_image_folder(root, "pacs", expected_counts={"photo": {"dog": 2, "horse": 2}})
    assert "domain 'photo' has 3 images where the dataset config expects 4" in caplog.text


def test_image_folder_config_trains_on_a_user_tree_through_build(make_config, small_run, tmp_path):
    root = tmp_path / "my_data"
    for d, domain in enumerate(["clipart", "photo", "sketch"]):
        for c, cls in enumerate(["cat", "dog"]):
            for i in range(4):
                (root / domain / cls).mkdir(parents=True, exist_ok=True)
                (root / domain / cls / f"{i}.png").write_bytes(image_bytes(40 * d + 20 * c + i))
    cfg = make_config(
        "dataset=image_folder",
        f"dataset.dataset.root={root}",
        "dataset.dataset.image_size=32",
        "dataset.test_domains=[sketch]",
        "dataset.num_workers=0",
        "backbone=resnet18_narrow",
        "+trainer.fast_dev_run=true",
        *small_run,
    )
    datamodule, model, trainer, _ = build(cfg)
    assert datamodule.dataset.name == "my_data"
    assert datamodule.dataset.classes == ["cat", "dog"]
    # The target's in part is reported, its out part held for oracle selection (target_holdout).
    assert [s.name for s in datamodule.eval_sets] == ["clipart", "photo", "sketch", "sketch/out"]
    batches = next(iter(datamodule.train_dataloader()))
    assert [b.x.shape for b in batches] == [(8, 3, 32, 32)] * 2 and [b.domain for b in batches] == [0, 1]
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 1
    assert torch.isfinite(next(model.parameters())).all()


@pytest.mark.parametrize(
    ("dataset", "folder", "num_classes"),
    [
        ("pacs", "PACS", 7),
        ("vlcs", "VLCS", 5),
        ("office_home", "office_home", 65),
        ("terra_incognita", "terra_incognita", 10),
        ("domain_net", "domain_net", 345),
    ],
)
def test_each_benchmark_config_reads_its_domainbed_folder(make_config, make_tree, caplog, dataset, folder, num_classes):
    cfg = make_config(f"dataset={dataset}", "dataset.test_domains=[1]")
    domains, classes = list(cfg.dataset.dataset.domains), list(cfg.dataset.dataset.classes)
    make_tree({d: {classes[-1]: 2} for d in domains}, name=folder)
    with caplog.at_level(logging.WARNING, logger=WARNING_LOGGER):
        datamodule = instantiate_or_explain(cfg.dataset)
        datamodule.setup()
    data = datamodule.dataset
    assert data.name == dataset and data.domain_names == domains and data.num_classes == num_classes
    assert {y for d in data.domains for _, y in d.samples} == {num_classes - 1}
    assert [data.domain_names[d] for d in datamodule.test_domains] == [domains[1]]
    assert f"domain '{domains[0]}' has 2 images where the dataset config expects" in caplog.text
