"""Diagnostics of what an optimizer does: OSGR, GSNR, update balance, feature maps, a toy landscape.

The callbacks are selected with ``callbacks=diagnostics``; ``python -m genie_dg.toy`` draws
the toy landscape.
"""

from genie_dg.diagnostics.callbacks import FeatureMap, OSGRMonitor, UpdateBalanceMonitor

__all__ = ["FeatureMap", "OSGRMonitor", "UpdateBalanceMonitor"]
