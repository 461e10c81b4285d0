"""Optimizers of genie-dg: :class:`GENIE`, also registered in timm's factory as ``"genie"``."""

from genie_dg.optim.genie import GENIE, register_timm

register_timm()

__all__ = ["GENIE", "register_timm"]
