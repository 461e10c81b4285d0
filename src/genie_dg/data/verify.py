"""``genie-dg verify-data``: count a dataset's images per domain and class against its config."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from genie_dg.conf import CONFIG_DIR
from genie_dg.data.download import default_data_dir
from genie_dg.data.image_folder import ImageTree, expected_total, find_unreadable, scan_image_tree
from genie_dg.errors import UserInputError
from genie_dg.resolvers import register_resolvers

IMAGE_FOLDER_TARGET = "genie_dg.data.domain_image_folder"


def _dataset_targets(config_dir: Path) -> dict[str, str | None]:
    """Each dataset config's name and what builds its data (``dataset._target_``)."""
    return {
        path.stem: ((yaml.safe_load(path.read_text()) or {}).get("dataset") or {}).get("_target_")
        for path in sorted((config_dir / "dataset").glob("*.yaml"))
    }


def _read_from_image_folders(targets: dict[str, str | None]) -> list[str]:
    return [name for name, target in targets.items() if target == IMAGE_FOLDER_TARGET]


def dataset_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The dataset configs read from image folders: the ones there are files to verify."""
    return _read_from_image_folders(_dataset_targets(config_dir))


def image_dataset_config(name: str, data_dir: Path, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The resolved ``dataset.dataset`` node of ``dataset=<name>`` with ``paths.data_dir=data_dir``."""
    targets = _dataset_targets(config_dir)
    choices = _read_from_image_folders(targets)
    if name not in targets:
        raise UserInputError(
            f"unknown dataset '{name}'; the image-folder configs in {config_dir / 'dataset'} are {', '.join(choices)}"
        )
    if targets[name] != IMAGE_FOLDER_TARGET:
        raise UserInputError(
            f"dataset '{name}' is built by {targets[name]}, not read from image folders: there are no "
            f"files to verify; verify-data checks {', '.join(choices)}"
        )
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"dataset={name}"])
    with open_dict(cfg):
        cfg.paths.data_dir = str(data_dir.expanduser().resolve())
    node = cfg.dataset.dataset
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


@dataclass(frozen=True)
class Mismatch:
    domain: str
    cls: str | None
    found: int
    expected: int

    def __str__(self) -> str:
        where = f"{self.domain}/{self.cls}" if self.cls else self.domain
        return f"{where}: {self.found} found, {self.expected} expected"


def compare_counts(tree: ImageTree, expected_counts: Mapping[str, int | Mapping[str, int]]) -> list[Mismatch]:
    """Every (domain[, class]) whose count differs from the config's expectation."""
    mismatches = []
    for domain, expected in expected_counts.items():
        if isinstance(expected, int):
            if tree.count(domain) != expected:
                mismatches.append(Mismatch(domain, None, tree.count(domain), expected))
            continue
        for cls, n in expected.items():
            if tree.count(domain, cls) != n:
                mismatches.append(Mismatch(domain, cls, tree.count(domain, cls), n))
    return mismatches


def counts_table(tree: ImageTree, expected_counts: Mapping[str, int | Mapping[str, int]], title: str) -> Table:
    """Classes by domains; a cell is ``found`` or ``found/expected``, red where they differ."""

    def cell(found: int, expected: int | None) -> str:
        if expected is None:
            return str(found)
        text = f"{found}/{expected}"
        return text if found == expected else f"[bold red]{text}[/]"

    table = Table(title=title)
    table.add_column("class")
    for domain in tree.domains:
        table.add_column(domain, justify="right")
    for cls in tree.classes:
        row = []
        for domain in tree.domains:
            expected = expected_counts.get(domain)
            row.append(cell(tree.count(domain, cls), expected.get(cls) if isinstance(expected, Mapping) else None))
        table.add_row(cls, *row)
    table.add_section()
    totals = []
    for domain in tree.domains:
        expected = expected_counts.get(domain)
        totals.append(cell(tree.count(domain), None if expected is None else expected_total(expected)))
    table.add_row("total", *totals)
    return table


def verify_data(
    name: str,
    data_dir: Path,
    root: Path | None = None,
    check_images: bool = False,
    console: Console | None = None,
) -> bool:
    """Print the counts of dataset ``name`` against its config; True when everything matches."""
    console = console or Console()
    node = image_dataset_config(name, data_dir)
    dataset_root = root or node["root"]
    if dataset_root is None:
        raise UserInputError(f"dataset '{name}' has no root in its config: pass --root /path/to/<domain>/<class>/ tree")
    tree = scan_image_tree(dataset_root, name, node.get("domains"), node.get("classes"))
    tree.warn_ignored(name)
    expected_counts = node.get("expected_counts") or {}
    console.print(counts_table(tree, expected_counts, f"{name}: images per class and domain in {tree.root}"))
    mismatches = compare_counts(tree, expected_counts)
    for mismatch in mismatches:
        console.print(f"[red]mismatch[/] {mismatch}", highlight=False)
    unreadable: dict[Path, str] = {}
    if check_images:
        paths = [f for per_class in tree.files.values() for images in per_class.values() for f in images]
        unreadable = find_unreadable(paths)
        for path, reason in unreadable.items():
            console.print(f"[red]unreadable[/] {path.relative_to(tree.root)}: {reason}", highlight=False)
        console.print(f"decoded {len(paths)} images: {len(unreadable)} unreadable", highlight=False)
    if not expected_counts:
        console.print(f"{name}: its config pins no expected counts; only the layout was checked", highlight=False)
    ok = not mismatches and not unreadable
    console.print(
        f"{name}: OK" if ok else f"{name}: {len(mismatches)} count mismatch(es), {len(unreadable)} unreadable image(s)",
        style="green" if ok else "red",
        highlight=False,
    )
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help=f"a dataset config name ({', '.join(dataset_names())})")
    parser.add_argument(
        "--data-dir", type=Path, default=default_data_dir(), help="parent folder (default: $DATA_DIR or ./data)"
    )
    parser.add_argument(
        "--root", type=Path, help="the dataset folder itself, instead of the config's place under --data-dir"
    )
    parser.add_argument("--check-images", action="store_true", help="also decode every image and list unreadable ones")


def run(args: argparse.Namespace) -> int:
    return 0 if verify_data(args.dataset, args.data_dir, args.root, args.check_images) else 1
