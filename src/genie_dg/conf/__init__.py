"""genie-dg's Hydra configs, shipped inside the package so that ``train.py``, the installed
``genie-dg`` commands and the Docker images compose the same ones wherever they run.

Add your own config groups beside them with ``hydra.searchpath=[file:///path/to/my_conf]`` (or
``--config-dir``); a name used here is taken from here, so give yours names of their own."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
"""The folder holding ``train.yaml`` and every config group."""
