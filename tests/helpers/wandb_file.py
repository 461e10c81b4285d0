"""Reads the records of an offline W&B run file (``run-<id>.wandb``) for tests.

The file is a LevelDB-style log, as wandb's former ``sdk/internal/datastore.py`` wrote it: a
7-byte header, then 32 KiB blocks of chunks (crc32, length, type: full/first/middle/last), each
record a serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, offset = [], b"", 7
    while offset + CHUNK_HEADER.size <= len(data):
        space = BLOCK - offset % BLOCK
        if space < CHUNK_HEADER.size:
            offset += space
            continue
        _, length, kind = CHUNK_HEADER.unpack_from(data, offset)
        chunk = data[offset + CHUNK_HEADER.size : offset + CHUNK_HEADER.size + length]
        offset += CHUNK_HEADER.size + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records
