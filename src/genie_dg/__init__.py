"""genie-dg: domain generalization with the GENIE optimizer on Lightning and Hydra."""

from genie_dg.optim import GENIE

__version__ = "0.1.0"
__all__ = ["GENIE", "__version__"]
