"""Fixtures of the data tests (helpers live in helpers.trees)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from helpers.trees import write_tree


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[..., Path]:
    """``make_tree({"photo": {"dog": 2}}, name="PACS")`` writes the tree under ``tmp_path/data``."""

    def make(counts: Mapping[str, Mapping[str, int]], name: str = "PACS") -> Path:
        return write_tree(tmp_path / "data" / name, counts)

    return make
