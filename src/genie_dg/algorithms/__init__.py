"""Pluggable DG methods; each is one file here plus one ``genie_dg/conf/algorithm/<name>.yaml``."""

from genie_dg.algorithms.arm import ARM
from genie_dg.algorithms.base import AlgorithmOutput, DGAlgorithm, DomainBatch, StepContext
from genie_dg.algorithms.coral import CORAL, coral_distance
from genie_dg.algorithms.dann import CDANN, DANN
from genie_dg.algorithms.erm import ERM
from genie_dg.algorithms.fish import Fish
from genie_dg.algorithms.fishr import Fishr
from genie_dg.algorithms.groupdro import GroupDRO
from genie_dg.algorithms.irm import IRM
from genie_dg.algorithms.miro import MIRO
from genie_dg.algorithms.mixstyle import MixStyle
from genie_dg.algorithms.mixup import Mixup
from genie_dg.algorithms.mldg import MLDG
from genie_dg.algorithms.mmd import MMD
from genie_dg.algorithms.mtl import MTL
from genie_dg.algorithms.rsc import RSC
from genie_dg.algorithms.sagnet import SagNet
from genie_dg.algorithms.vrex import VREx

__all__ = [
    "ARM",
    "CDANN",
    "CORAL",
    "DANN",
    "ERM",
    "IRM",
    "MIRO",
    "MLDG",
    "MMD",
    "MTL",
    "RSC",
    "AlgorithmOutput",
    "DGAlgorithm",
    "DomainBatch",
    "Fish",
    "Fishr",
    "GroupDRO",
    "MixStyle",
    "Mixup",
    "SagNet",
    "StepContext",
    "VREx",
    "coral_distance",
]
