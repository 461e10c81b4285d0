"""Tiny images and image trees in DomainBed's layout, written by the data tests."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]


def image_bytes(value: int = 0, fmt: str = "PNG", size: int = 8) -> bytes:
    """An encoded ``size`` x ``size`` RGB image whose pixels are all ``value``."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def write_image(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(value, "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"))
    return path


def write_tree(root: Path, counts: Mapping[str, Mapping[str, int]]) -> Path:
    """``counts[domain][class]`` PNG files under ``root/<domain>/<class>/`` (one encoding, copied)."""
    png = image_bytes(127)
    for domain, per_class in counts.items():
        for cls, n in per_class.items():
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:05d}.png").write_bytes(png)
    return root
